// CPU kernel of the sparse-masked AdamW step.
//
// All tensors of one dtype are cut into chunks of kChunk trained entries and the chunks of every
// tensor go to one at::parallel_for, so many small tensors (biases) and a few large ones keep all
// threads busy alike. At the densities sparse fine-tuning uses, each trained entry sits on its own
// cache line of the parameter and of the gradient, so the gathers, not the arithmetic, set the
// pace; the tiles below keep many of them in flight.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "sparse_optim/sparse_optim.h"

namespace fastpeft {
namespace {

constexpr int64_t kChunk = 4096;
constexpr int kTile = 256;

// Entries go through in tiles: gather the tile's parameter and gradient values into float
// buffers (a tight loop of independent loads, so many cache misses are in flight at once), run
// the update over the buffers and the contiguous moments (no gathers, so the compiler can
// vectorise it; -fno-math-errno lets sqrt become a vector instruction), then scatter the
// parameters back. An entry with an index outside the parameter reads element 0 and is never
// written back; its moments are then meaningless, which only a corrupt mask can cause.
template <typename T, typename Index>
void update_chunk(const SparseAdamWTensor& t, int64_t begin, int64_t end, const AdamWScalars& s, float grad_scale) {
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const Index* idx = static_cast<const Index*>(t.indices);
  const int64_t numel = t.numel;
  const AdamWScalars sc = s;  // a local copy: stores to the moments cannot alias it
  float p[kTile], g[kTile];
  int64_t e[kTile];
  bool ok[kTile];
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, end - j0));
    for (int i = 0; i < n; ++i) {
      e[i] = idx ? static_cast<int64_t>(idx[j0 + i]) : j0 + i;
      ok[i] = e[i] >= 0 && e[i] < numel;  // never touch memory outside the parameter
      const int64_t safe = ok[i] ? e[i] : 0;
      p[i] = static_cast<float>(param[safe]);
      g[i] = static_cast<float>(grad[safe]) / grad_scale;  // torch's fused AdamW divides too
    }
    float* __restrict m = t.exp_avg + j0;
    float* __restrict v = t.exp_avg_sq + j0;
    for (int i = 0; i < n; ++i) adamw_update(p[i], g[i], m[i], v[i], sc);
    for (int i = 0; i < n; ++i) {
      if (ok[i]) param[e[i]] = static_cast<T>(p[i]);
    }
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
