// CPU merge of prefix attention's two parts (prefix_part.cpp): one pass over the rows instead of
// eight ATen passes over [B, H, Sq, D] (logaddexp, two weights, masking, two products, a sum).
//
// History: the prefix part used to be a hand-written blocked loop around small ATen GEMMs; at
// S = 512, P = 64 its forward+backward took ~17 ms of a 44 ms step on 2 cores, the fused CPU
// attention kernels now used for it take ~5 ms (bench_prefix_attention.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The merge epilogue, one pass over the rows (instead of eight ATen passes over [B, H, Sq, D]):
//   L = logaddexp(L1, L2), O = exp(L1 - L) O1 + exp(L2 - L) O2, in float32, rounded once.
// A row that sees no sequence key has L1 = -inf and an O1 that may be NaN: its weight is 0 and O1
// is not read. pre_out undefined: no prefix (P = 0). out may alias seq_out (each row is read
// before it is written). Tensors are [B, H, Sq, D] with a contiguous last dim; lse contiguous.
template <typename T>
void merge_rows(const at::Tensor& seq_out, const at::Tensor& seq_lse, const at::Tensor& pre_out,
                const at::Tensor& pre_lse, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = out.size(0), H = out.size(1), Sq = out.size(2), D = out.size(3);
  const bool has_prefix = pre_out.defined();
  const auto l1 = seq_lse.contiguous();
  const auto l2 = has_prefix ? pre_lse.contiguous() : at::Tensor();
  const float* l1p = l1.data_ptr<float>();
  const float* l2p = has_prefix ? l2.data_ptr<float>() : nullptr;
  float* lp = lse.data_ptr<float>();
  auto row = [](const at::Tensor& t, int64_t b, int64_t h, int64_t s) {
    return static_cast<const T*>(t.const_data_ptr()) + b * t.stride(0) + h * t.stride(1) + s * t.stride(2);
  };
  at::parallel_for(0, B * H * Sq, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * Sq), h = (r / Sq) % H, s = r % Sq;
      const float a = l1p[r], c = has_prefix ? l2p[r] : kNegInf;
      const float m = std::max(a, c);
      T* o = static_cast<T*>(out.data_ptr()) + b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
      if (m == kNegInf) {  // no prefix and no visible key: the row is 0 with lse -inf
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(0.0f);
        lp[r] = kNegInf;
        continue;
      }
      const float wa = a == kNegInf ? 0.0f : std::exp(a - m), wc = c == kNegInf ? 0.0f : std::exp(c - m);
      const float inv = 1.0f / (wa + wc);
      lp[r] = m + std::log(wa + wc);
      const T* o1 = wa > 0.0f ? row(seq_out, b, h, s) : nullptr;
      const T* o2 = wc > 0.0f ? row(pre_out, b, h, s) : nullptr;
      const float f1 = wa * inv, f2 = wc * inv;
      for (int64_t d = 0; d < D; ++d) {
        const float v1 = o1 ? f1 * static_cast<float>(o1[d]) : 0.0f;
        const float v2 = o2 ? f2 * static_cast<float>(o2[d]) : 0.0f;
        o[d] = static_cast<T>(v1 + v2);
      }
    }
  });
}

}  // namespace

void prefix_merge_rows_cpu(const at::Tensor& seq_out, const at::Tensor& seq_lse, const at::Tensor& pre_out,
                           const at::Tensor& pre_lse, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "prefix_merge_rows_cpu", [&] {
    merge_rows<scalar_t>(seq_out, seq_lse, pre_out, pre_lse, out, lse);
  });
}

}  // namespace fastpeft
