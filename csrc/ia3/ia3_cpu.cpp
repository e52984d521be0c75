// CPU kernels of (IA)^3: row-wise scaling by a task's vector, and the per-task reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ia3/ia3.h"

namespace fastpeft {
namespace {

inline int64_t task_of_row(const TaskMap& tasks, const int64_t* ids, int64_t row) {
  return ids ? ids[row / tasks.rows_per_example] : 0;
}

template <typename T, typename V>
void scale_rows(const T* x, T* out, const V* vectors, const TaskMap& tasks, int64_t M, int64_t d) {
  const int64_t* ids = tasks.ids_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const V* v = vectors + task_of_row(tasks, ids, m) * d;
      const T* xr = x + m * d;
      T* o = out + m * d;
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<T>(static_cast<float>(xr[j]) * static_cast<float>(v[j]));
    }
  });
}

// acc[j] += grad * saved (or grad) over the rows of one example, and optionally
// scaled_out = grad * v. Branch-free inner loops (HasSaved / WriteScaled are template
// parameters) so the compiler vectorises them.
template <typename T, typename V, bool HasSaved, bool WriteScaled>
void reduce_rows(const T* grad, const T* saved, const V* v, T* scaled_out, float* acc, int64_t row0, int64_t row1,
                 int64_t d, int64_t j0, int64_t n) {
  for (int64_t m = row0; m < row1; ++m) {
    const T* g = grad + m * d + j0;
    const T* s = HasSaved ? saved + m * d + j0 : nullptr;
    T* o = WriteScaled ? scaled_out + m * d + j0 : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const float gj = static_cast<float>(g[j]);
      acc[j] += HasSaved ? gj * static_cast<float>(s[j]) : gj;
      if (WriteScaled) o[j] = static_cast<T>(gj * static_cast<float>(v[j]));  // after reading g: o may alias g
    }
  }
}

// Per-example partial sums in float32 (columns split across threads, so a batch of one long example
// still uses every core), then a sum over each task's examples. Deterministic: no atomics.
template <typename T, typename V>
at::Tensor task_reduce(const T* grad, const T* saved, const V* vectors, const TaskMap& tasks, bool divide,
                       T* scaled_out, int64_t M, int64_t d, const at::TensorOptions& float_opts) {
  const int64_t* ids = tasks.ids_ptr();
  const int64_t B = tasks.num_examples;
  const int64_t S = tasks.rows_per_example;
  auto partial = at::empty({B, d}, float_opts);
  float* part = partial.data_ptr<float>();
  constexpr int64_t kCols = 256;
  const int64_t col_tiles = (d + kCols - 1) / kCols;
  auto rows = reduce_rows<T, V, false, false>;
  if (saved && scaled_out) rows = reduce_rows<T, V, true, true>;
  else if (saved) rows = reduce_rows<T, V, true, false>;
  else if (scaled_out) rows = reduce_rows<T, V, false, true>;
  at::parallel_for(0, B * col_tiles, 1, [&](int64_t w0, int64_t w1) {
    float acc[kCols];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / col_tiles;
      const int64_t j0 = (w % col_tiles) * kCols;
      const int64_t n = std::min(kCols, d - j0);
      std::fill(acc, acc + n, 0.0f);
      const V* v = vectors ? vectors + (ids ? ids[b] : 0) * d + j0 : nullptr;
      rows(grad, saved, v, scaled_out, acc, b * S, (b + 1) * S, d, j0, n);
      std::copy(acc, acc + n, part + b * d + j0);
    }
  });
  auto result = at::zeros({tasks.num_tasks, d}, float_opts);
  float* res = result.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {  // B x d adds: small next to the M x d pass above
    float* r = res + (ids ? ids[b] : 0) * d;
    const float* p = part + b * d;
    for (int64_t j = 0; j < d; ++j) r[j] += p[j];
  }
  if (divide) {
    for (int64_t i = 0; i < tasks.num_tasks * d; ++i) {
      const float l = static_cast<float>(vectors[i]);
      res[i] = l == 0.0f ? 0.0f : res[i] / l;
    }
  }
  return result;
}

template <typename Fn>
void dispatch_vectors(const at::Tensor& x, const at::Tensor& vectors, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ia3_cpu", [&] {
    using T = scalar_t;
    if (!vectors.defined() || vectors.scalar_type() == at::kFloat) {
      fn(T{}, float{});
    } else {
      fn(T{}, T{});
    }
  });
}

}  // namespace

void ia3_scale_cpu(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks) {
  dispatch_vectors(x, vectors, [&](auto t, auto v) {
    using T = decltype(t);
    using V = decltype(v);
    scale_rows<T, V>(x.data_ptr<T>(), out.data_ptr<T>(), vectors.data_ptr<V>(), tasks, x.size(0), x.size(1));
  });
}

at::Tensor ia3_task_reduce_cpu(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                               const TaskMap& tasks, bool divide, at::Tensor* scaled_out) {
  at::Tensor result;
  dispatch_vectors(grad, vectors, [&](auto t, auto v) {
    using T = decltype(t);
    using V = decltype(v);
    result = task_reduce<T, V>(grad.data_ptr<T>(), saved.defined() ? saved.data_ptr<T>() : nullptr,
                               vectors.defined() ? vectors.data_ptr<V>() : nullptr, tasks, divide,
                               scaled_out ? scaled_out->data_ptr<T>() : nullptr, grad.size(0), grad.size(1),
                               grad.options().dtype(at::kFloat));
  });
  return result;
}

}  // namespace fastpeft
