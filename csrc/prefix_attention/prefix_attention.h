// Prefix-KV attention: shared declarations.
//
// Every query attends to P prefix positions of one prefix set (chosen per example from a bank of N
// sets) plus the causal / padded part of its own sequence. The op splits that softmax in two:
//   - the sequence part goes through PyTorch's fused attention kernels, which return the output O1
//     and its log-sum-exp L1 (sequence_attention.cpp);
//   - the prefix part runs in the same fused kernels over the P prefix keys, and the two are
//     merged by log-sum-exp into the output O and log-sum-exp L (prefix_part.cpp).
// Backward hands the merged O and L to the sequence backward kernel: with them it computes the
// sequence part of exactly the joint softmax, and the prefix keys' backward the rest. So
// [prefix; keys] never exists.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastpeft {

// Sizes of one call: q [B, H, Sq, D], k/v [B, Hkv, Skv, D], prefix_k/v [N, Hkv, P, D].
struct PrefixShape {
  int64_t B = 0, H = 0, Hkv = 0, Sq = 0, Skv = 0, D = 0, N = 0, P = 0;
  int64_t group() const { return H / Hkv; }
};

// ---- the sequence part (sequence_attention.cpp) ------------------------------------------------

// The attention mask of the sequence part, prepared once per call for whichever fused kernel runs.
struct SequenceMask {
  at::Tensor bias;       // additive, q's dtype, broadcastable to [B, H, Sq, Skv]; undefined if none
  bool causal_flag = false;  // pass is_causal to the kernel (only when Sq == Skv: then top-left ==
                             // bottom-right alignment); other causal cases are folded into `bias`
  at::Tensor row_empty;  // bool, broadcastable to [B, H, Sq]: rows that see no sequence key
};

SequenceMask prepare_sequence_mask(const c10::optional<at::Tensor>& attention_mask, bool causal,
                                   const PrefixShape& s, const at::Tensor& q);

struct SequenceForward {
  at::Tensor out;  // [B, H, Sq, D] (any strides, last dim contiguous)
  at::Tensor lse;  // fp32 [B, H, Sq] (any strides); -inf where a row sees no sequence key
};

SequenceForward sequence_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const SequenceMask& mask, double scale);

// Gradients of the sequence part of the joint softmax, given the merged output and log-sum-exp.
// Returns grad_q [B, H, Sq, D], grad_k / grad_v [B, Hkv, Skv, D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const SequenceMask& mask, const at::Tensor& out, const at::Tensor& lse, double scale);

// ---- the prefix part (prefix_part.cpp; the CPU merge in prefix_attention_cpu.cpp) ---------------
//
// Tensors: q, seq_out, out, grad_out, grad_q are [B, H, Sq, D] with any strides but a contiguous
// last dim; seq_lse [B, H, Sq] fp32 with any strides; lse [B, H, Sq] fp32 contiguous; prefix_k/v
// [N, Hkv, P, D] contiguous; prefix_index int64 [B] contiguous on the same device, or undefined
// (set 0 for every example).

// Runs the fused attention over each example's prefix and merges it with (seq_out, seq_lse) into
// (out, lse). out may alias seq_out.
void prefix_merge_forward(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                          const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                          double scale, at::Tensor& out, at::Tensor& lse);

// Prefix part of backward. grad_q (if defined) is accumulated into. grad_prefix_k/v come as a pair
// or both undefined: fp32 [N, Hkv, P, D] buffers filled with zeros that receive the per-set sums.
void prefix_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                     double scale, at::Tensor& grad_q, at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v);

// Each example's prefix set [B, Hkv, P, D] from the bank: a stride-0 view of set 0 on the CPU when
// prefix_index is undefined (a shared prefix), else a row gather.
at::Tensor prefix_per_example(const at::Tensor& bank, const at::Tensor& prefix_index, int64_t B);

// into[n] += sum of per_example[b] over the examples b of set n, in float32 (into: fp32 [N, ...]);
// fixed order, no atomics (CUDA: a GEMM with the one-hot assignment; CPU: index_add_).
void add_prefix_grad_per_set(const at::Tensor& per_example, const at::Tensor& prefix_index, at::Tensor& into);

// ---- the CPU's one-call path (joint_attention_cpu.cpp) -------------------------------------------
//
// On the CPU, while causality saves the fused kernel no work (it skips key blocks of 512 past the
// diagonal, so not at all for Skv <= 512, and never without causality), one fused call over
// [prefix; keys] with the mask extended by P visible columns is faster than the two calls of the
// split: the split pays a second kernel launch over all of q and a backward over P keys that the
// CPU kernel runs at a fraction of its throughput. [prefix; keys] exists only inside forward and
// inside backward (rebuilt there); it is never saved.
// FASTPEFT_PREFIX_CPU_PATH=split|joint forces one path (tests run both).
// causal_flag: the sequence mask's (SequenceMask::causal_flag), the causality the fused kernel could exploit.
bool joint_cpu_applies(const at::Tensor& q, const PrefixShape& s, bool causal_flag);

// (out, lse) of the joint softmax over each example's prefix and its sequence keys.
std::tuple<at::Tensor, at::Tensor> joint_cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                     const at::Tensor& prefix_index, const SequenceMask& mask,
                                                     const PrefixShape& s, double scale);

// grad_q, grad_k, grad_v; grad_prefix_k/v (fp32 [N, Hkv, P, D] zeros, or both undefined) receive
// the per-set sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cpu_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& prefix_index, const SequenceMask& mask,
    const PrefixShape& s, const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor& grad_prefix_k,
    at::Tensor& grad_prefix_v);

// The CPU merge: L = logaddexp(L1, L2), O = exp(L1 - L) O1 + exp(L2 - L) O2 per row (pre_out
// undefined: no prefix). out may alias seq_out.
void prefix_merge_rows_cpu(const at::Tensor& seq_out, const at::Tensor& seq_lse, const at::Tensor& pre_out,
                           const at::Tensor& pre_lse, at::Tensor& out, at::Tensor& lse);

}  // namespace fastpeft
