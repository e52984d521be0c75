// CPU kernel of the sparse-masked AdamW step.
//
// All tensors of one dtype are cut into chunks of kChunk trained entries and the chunks of every
// tensor go to one at::parallel_for, so many small tensors (biases) and a few large ones keep all
// threads busy alike. Within a chunk the loop is gather -> update -> scatter per entry; at the
// densities sparse fine-tuning uses, each trained entry sits on its own cache line of the
// parameter and of the gradient, so the loop is bound by those line transfers, not by arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "sparse_optim/sparse_optim.h"

namespace fastpeft {
namespace {

constexpr int64_t kChunk = 4096;

template <typename T, typename Index>
void update_chunk(const SparseAdamWTensor& t, int64_t begin, int64_t end, const AdamWScalars& s, float grad_scale) {
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const Index* idx = static_cast<const Index*>(t.indices);
  const int64_t numel = t.numel;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t e = idx ? static_cast<int64_t>(idx[j]) : j;
    if (e < 0 || e >= numel) continue;  // never write outside the parameter, whatever the mask holds
    float p = static_cast<float>(param[e]);
    float g = static_cast<float>(grad[e]);
    if (grad_scale != 1.0f) g = g / grad_scale;  // torch's fused AdamW divides too
    adamw_update(p, g, t.exp_avg[j], t.exp_avg_sq[j], s);
    param[e] = static_cast<T>(p);
  }
}

template <typename T>
void update_all(std::vector<SparseAdamWTensor>& tensors, const AdamWHyper& h, float grad_scale) {
  int64_t chunks = 0;
  std::vector<int64_t> firsts;
  std::vector<AdamWScalars> scalars;
  for (auto& t : tensors) {
    t.first_chunk = chunks;
    firsts.push_back(chunks);
    chunks += (t.count + kChunk - 1) / kChunk;
    scalars.push_back(adamw_scalars(h, static_cast<double>(*t.step)));
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const size_t ti = std::upper_bound(firsts.begin(), firsts.end(), c) - firsts.begin() - 1;
      const auto& t = tensors[ti];
      const int64_t begin = (c - t.first_chunk) * kChunk;
      const int64_t end = std::min(t.count, begin + kChunk);
      switch (t.index_kind) {
        case IndexKind::Int32: update_chunk<T, int32_t>(t, begin, end, scalars[ti], grad_scale); break;
        case IndexKind::Int64: update_chunk<T, int64_t>(t, begin, end, scalars[ti], grad_scale); break;
        case IndexKind::None: update_chunk<T, int64_t>(t, begin, end, scalars[ti], grad_scale); break;
      }
    }
  });
}

}  // namespace

void sparse_adamw_cpu_kernel(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
                             const float* grad_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // AMP found inf/nan: skip the whole step
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_adamw_cpu", [&] {
    update_all<scalar_t>(tensors, h, scale);
  });
}

}  // namespace fastpeft
