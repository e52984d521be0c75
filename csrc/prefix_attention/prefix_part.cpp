// The prefix part of prefix attention, on every device: PyTorch's fused attention over the P prefix
// keys (the same kernels as the sequence part, sequence_attention.cpp, with no mask), merged with
// the sequence part by log-sum-exp (the cascade-attention identity), so no matmul of prefix
// attention runs in fastpeft's own code:
//
//   forward   (O2, L2) = fused_attention(q, K_pre, V_pre)
//             L = logaddexp(L1, L2),  O = exp(L1 - L) O1 + exp(L2 - L) O2
//   backward  (dq, dK_pre, dV_pre) = fused_attention_backward(dO, q, K_pre, V_pre, O, L)
//             with the *merged* O and L: the kernels form P = exp(s - L) and Delta = rowsum(dO * O)
//             from them, which are exactly the prefix columns of the joint softmax's gradient.
//
// K_pre / V_pre [B, Hkv, P, D] are each example's prefix set: on the CPU the bank expanded over
// the batch (a stride-0 view) for a shared prefix; a row gather for a bank (and always on CUDA,
// whose kernels take dense operands). prefix_index was range-checked by the op. Bank gradients: the per-example gradients summed per set in
// float32 in a fixed order, no atomics (add_prefix_grad_per_set): deterministic.
#include <ATen/ATen.h>

#include <limits>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {

at::Tensor prefix_per_example(const at::Tensor& bank, const at::Tensor& prefix_index, int64_t B) {
  if (!prefix_index.defined()) {
    auto shared = bank.narrow(0, 0, 1).expand({B, bank.size(1), bank.size(2), bank.size(3)});
    return bank.is_cpu() ? shared : shared.contiguous();
  }
  return at::embedding(bank.reshape({bank.size(0), -1}), prefix_index)
      .view({B, bank.size(1), bank.size(2), bank.size(3)});
}

void add_prefix_grad_per_set(const at::Tensor& per_example, const at::Tensor& prefix_index, at::Tensor& into) {
  const int64_t B = per_example.size(0), N = into.size(0);
  if (!prefix_index.defined()) {  // one set: a sum over the batch, read in place (no copy of a strided slice)
    into.select(0, 0).add_(at::sum(per_example, {0}, /*keepdim=*/false, at::kFloat));
    return;
  }
  if (per_example.is_cpu()) {  // the CPU's index_add_ adds in index order: deterministic, no copy of the slice
    into.index_add_(0, prefix_index, per_example.to(at::kFloat));
    return;
  }
  const auto flat = per_example.reshape({B, -1}).to(at::kFloat);
  const auto sets = at::arange(N, prefix_index.options()).unsqueeze(1);
  const auto onehot = sets.eq(prefix_index.unsqueeze(0)).to(at::kFloat);  // [N, B]
  into.view({N, -1}).addmm_(onehot, flat);
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The merge in ATen ops (CUDA and other devices; the CPU has a one-pass kernel).
void merge_aten(const at::Tensor& seq_out, const at::Tensor& seq_lse, const at::Tensor& pre_out,
                const at::Tensor& pre_lse, at::Tensor& out, at::Tensor& lse) {
  if (!pre_out.defined()) {  // no prefix: the sequence part alone; a row that sees nothing is 0
    lse.copy_(seq_lse);
    out.copy_(seq_out.masked_fill(seq_lse.unsqueeze(-1).eq(kNegInf), 0.0));
    return;
  }
  lse.copy_(at::logaddexp(seq_lse, pre_lse));
  const auto l = lse.unsqueeze(-1);
  const auto seq_l = seq_lse.unsqueeze(-1);
  const auto w_seq = (seq_l - l).exp_();  // 0 where L1 = -inf, whose O1 may be NaN: masked
  const auto w_pre = (pre_lse.unsqueeze(-1) - l).exp_();
  // Out of place: for float32 .to() returns seq_out itself, which must not be written here.
  auto merged = seq_out.to(at::kFloat).masked_fill(seq_l.eq(kNegInf), 0.0).mul_(w_seq);
  merged.addcmul_(pre_out.to(at::kFloat), w_pre);
  out.copy_(merged);
}

}  // namespace

void prefix_merge_forward(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                          const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                          double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), P = prefix_k.size(2);
  SequenceForward pre;
  if (P > 0) {
    const auto pk = prefix_per_example(prefix_k, prefix_index, B);
    const auto pv = prefix_per_example(prefix_v, prefix_index, B);
    pre = sequence_attention_forward(q, pk, pv, SequenceMask{}, scale);
  }
  if (q.is_cpu()) return prefix_merge_rows_cpu(seq_out, seq_lse, pre.out, pre.lse, out, lse);
  merge_aten(seq_out, seq_lse, pre.out, pre.lse, out, lse);
}

void prefix_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                     double scale, at::Tensor& grad_q, at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const int64_t B = q.size(0);
  const auto pk = prefix_per_example(prefix_k, prefix_index, B);
  const auto pv = prefix_per_example(prefix_v, prefix_index, B);
  auto [dq, dk, dv] = sequence_attention_backward(grad_out, q, pk, pv, SequenceMask{}, out, lse, scale);
  if (grad_q.defined()) grad_q.add_(dq);
  if (!grad_prefix_k.defined()) return;  // the bank gradients come as a pair or not at all
  add_prefix_grad_per_set(dk, prefix_index, grad_prefix_k);
  add_prefix_grad_per_set(dv, prefix_index, grad_prefix_v);
}

}  // namespace fastpeft
