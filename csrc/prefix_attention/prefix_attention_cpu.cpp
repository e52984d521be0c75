// CPU prefix part: PyTorch's fused CPU attention over the P prefix keys, merged with the sequence
// part by log-sum-exp (the cascade-attention identity), so no matmul of prefix attention runs in
// fastpeft's own loops.
//
//   forward   (O2, L2) = flash_cpu(q, K_pre, V_pre)            no mask: every query sees its prefix
//             L = logaddexp(L1, L2),  O = exp(L1 - L) O1 + exp(L2 - L) O2
//   backward  (dq, dK_pre, dV_pre) = flash_cpu_backward(dO, q, K_pre, V_pre, O, L)
//             with the *merged* O and L: the kernel forms P = exp(s - L) and Delta = rowsum(dO * O)
//             from them, which are exactly the prefix columns of the joint softmax's gradient.
//
// K_pre / V_pre [B, Hkv, P, D] are each example's prefix set: the bank expanded over the batch
// (stride 0, no copy) for a shared prefix, a row gather (B * Hkv * P * D elements, the size of the
// prefix itself per example) for a bank. Bank gradients: the per-example [B, Hkv, P, D] gradients
// summed per set in float32 with a GEMM against the one-hot assignment (fixed order, no atomics).
//
// Before this, the prefix part was a hand-written blocked loop around small ATen GEMMs; at
// S = 512, P = 64 its forward+backward took ~17 ms of a 44 ms step on 2 cores, the fused kernels
// take ~5 ms (bench_prefix_attention.py).
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

// Each example's prefix set, [B, Hkv, P, D] in q's dtype.
at::Tensor prefix_per_example(const at::Tensor& bank, const at::Tensor& prefix_index, int64_t B,
                              at::ScalarType dtype) {
  const auto b = bank.scalar_type() == dtype ? bank : bank.to(dtype);
  if (!prefix_index.defined()) return b.narrow(0, 0, 1).expand({B, b.size(1), b.size(2), b.size(3)});
  return at::embedding(b.reshape({b.size(0), -1}), prefix_index).view({B, b.size(1), b.size(2), b.size(3)});
}

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

void prefix_merge_forward_cpu(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                              const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), P = prefix_k.size(2);
  at::Tensor pre_out, pre_lse;
  if (P > 0) {
    const auto pk = prefix_per_example(prefix_k, prefix_index, B, q.scalar_type());
    const auto pv = prefix_per_example(prefix_v, prefix_index, B, q.scalar_type());
    std::tie(pre_out, pre_lse) = at::_scaled_dot_product_flash_attention_for_cpu(
        q, pk, pv, /*dropout_p=*/0.0, /*is_causal=*/false, c10::nullopt, scale);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_merge_cpu", [&] {
    merge_rows<scalar_t>(seq_out, seq_lse, pre_out, pre_lse, out, lse);
  });
}

void prefix_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                         const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                         at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const int64_t B = q.size(0), N = prefix_k.size(0);
  const auto pk = prefix_per_example(prefix_k, prefix_index, B, q.scalar_type());
  const auto pv = prefix_per_example(prefix_v, prefix_index, B, q.scalar_type());
  // The kernel reads O and L of the joint softmax; rows whose L is -inf (they see nothing at all)
  // have O = 0 and get no gradient.
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad_out, q, pk, pv, out, lse, /*dropout_p=*/0.0, /*is_causal=*/false, c10::nullopt, scale);
  if (grad_q.defined()) grad_q.add_(dq);
  if (!grad_prefix_k.defined()) return;  // the bank gradients come as a pair or not at all
  auto per_set = [&](const at::Tensor& per_example, at::Tensor& into) {
    const auto flat = per_example.reshape({B, -1}).to(at::kFloat);
    if (!prefix_index.defined()) {
      into.view({N, -1}).select(0, 0).add_(flat.sum(0));
    } else {
      const auto sets = at::arange(N, prefix_index.options()).unsqueeze(1);
      const auto onehot = sets.eq(prefix_index.unsqueeze(0)).to(at::kFloat);  // [N, B]
      into.view({N, -1}).addmm_(onehot, flat);
    }
  };
  per_set(dk, grad_prefix_k);
  per_set(dv, grad_prefix_v);
}

}  // namespace fastpeft
