// Prefix-KV attention: shared declarations.
//
// Every query attends to P prefix positions of one prefix set (chosen per example from a bank of N
// sets) plus the causal / padded part of its own sequence. The op splits that softmax in two:
//   - the sequence part goes through PyTorch's fused attention kernels, which return the output O1
//     and its log-sum-exp L1 (sequence_attention.cpp);
//   - the prefix part: on the CPU the same fused kernel over the P prefix keys, merged by
//     log-sum-exp (prefix_attention_cpu.cpp); on CUDA this folder's own kernel, which folds the P
//     prefix scores into the running softmax state (m = L1, l = 1, acc = O1). Either writes the
//     merged output O and log-sum-exp L.
// Backward hands the merged O and L to the sequence backward kernel: with them it computes the
// sequence part of exactly the joint softmax, and the prefix kernels compute the rest. So
// [prefix; keys] never exists (nor, on CUDA, a batch-repeated prefix).
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

// ---- the prefix part (prefix_attention_cpu.cpp, prefix_attention_cuda.cu) ----------------------
//
// Tensors: q, seq_out, out, grad_out, grad_q are [B, H, Sq, D] with any strides but a contiguous
// last dim; seq_lse [B, H, Sq] fp32 with any strides; lse [B, H, Sq] fp32 contiguous; prefix_k/v
// [N, Hkv, P, D] contiguous; prefix_index int64 [B] contiguous on the same device, or undefined
// (set 0 for every example).

// Folds the prefix into (seq_out, seq_lse) and writes (out, lse). out may alias seq_out.
void prefix_merge_forward_cpu(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                              const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse);

// Prefix part of backward. grad_q (if defined) is accumulated into. grad_prefix_k/v come as a pair
// or both undefined: fp32 [N, Hkv, P, D] buffers filled with zeros that receive the per-set sums.
void prefix_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                         const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                         at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v);

#ifdef FASTPEFT_WITH_CUDA
void prefix_merge_forward_cuda(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                               const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                               const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse);
void prefix_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                          const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                          const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                          at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v);
#endif

}  // namespace fastpeft
