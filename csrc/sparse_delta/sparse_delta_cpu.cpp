// CPU kernels of the sparse-delta building blocks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "sparse_delta/sparse_delta.h"

namespace fastpeft {
namespace {

template <typename T, typename Index>
void add_values(T* out, int64_t numel, const Index* idx, const float* values, int64_t k) {
  at::parallel_for(0, k, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t e = idx[j];
      if (e < 0 || e >= numel) continue;
      out[e] = static_cast<T>(static_cast<float>(out[e]) + values[j]);
    }
  });
}

// Dot product of two rows in float32, with 8 independent partial sums so the loop pipelines.
template <typename T>
float row_dot(const T* a, const T* b, int64_t len) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t m = 0;
  for (; m + 8 <= len; m += 8) {
    for (int u = 0; u < 8; ++u) part[u] += static_cast<float>(a[m + u]) * static_cast<float>(b[m + u]);
  }
  for (; m < len; ++m) part[0] += static_cast<float>(a[m]) * static_cast<float>(b[m]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename T, typename Index>
void rows_dot_accum(float* acc, const T* grad_t, const T* x_t, int64_t out_features, int64_t in_features, int64_t len,
                    const Index* idx, int64_t k) {
  const int64_t numel = out_features * in_features;
  // Sorted indices walk grad_t row by row, so each grad row stays in cache for its indices.
  at::parallel_for(0, k, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t e = idx[j];
      if (e < 0 || e >= numel) continue;
      acc[j] += row_dot(grad_t + (e / in_features) * len, x_t + (e % in_features) * len, len);
    }
  });
}

}  // namespace

void sparse_delta_add_cpu(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sparse_delta_add_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_add_cpu_index", [&] {
      add_values(out.data_ptr<scalar_t>(), out.numel(), indices.data_ptr<index_t>(), values.data_ptr<float>(),
                 indices.numel());
    });
  });
}

void sparse_delta_rows_dot_accum_cpu(at::Tensor& acc, const at::Tensor& grad_t, const at::Tensor& x_t,
                                     const at::Tensor& indices) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sparse_delta_rows_dot_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_rows_dot_cpu_index", [&] {
      rows_dot_accum(acc.data_ptr<float>(), grad_t.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), grad_t.size(0),
                     x_t.size(0), x_t.size(1), indices.data_ptr<index_t>(), indices.numel());
    });
  });
}

}  // namespace fastpeft
