// Every fastpeft operator schema, defined once. Device kernels register with TORCH_LIBRARY_IMPL in
// their family's folder; Python adds fake (meta) kernels and autograd in fastpeft/ops/.
//
// Conventions: ops ending in `_` write into an argument marked (a!) and return nothing. Lists of
// weights describe projections that share one input (q/k/v, gate/up); a single projection is a
// list of one.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "build_info_generated.h"
#include "common/workspace.h"

TORCH_LIBRARY(fastpeft, m) {
  // ---- 4-bit weights (bitsandbytes NF4 / FP4) -------------------------------------------------
  m.def(
      "dequantize_4bit_(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, int nested_blocksize, str quant_type, "
      "Tensor(a!) out) -> ()");

  // ---- int8 row-wise weights (bitsandbytes LLM.int8(), Linear8bitLt) ---------------------------
  // out = (data * scale[:, None]) / 127 per element in float32, rounded once to out's dtype;
  // data int8 [O, K], scale float32 [O], out [O, K].
  m.def("dequantize_int8_rowwise_(Tensor data, Tensor scale, Tensor(a!) out) -> ()");

  // ---- Frozen base weights of the linear families ---------------------------------------------
  // Every linear op (LoRA, multi-LoRA, (IA)^3, sparse deltas) takes its frozen weight(s) as
  // `str weight_format, Tensor?[] weight_tensors, int[] weight_ints`: a format tag ("dense", "nf4", "fp4", "int8") and the
  // tensors and integers of each weight, weight after weight (layout: common/frozen_weights.h;
  // Python builds it with fastpeft.quant.frozen_weight_args).

  // ---- LoRA -----------------------------------------------------------------------------------
  // out_i = x W_i^T + b_i + scaling_i * (dropout(x) A_i^T) B_i^T over the weights W_i of
  // projections that share x; also returns the shrink dropout(x) [A_1; A_2; ...]^T of shape
  // [M, sum r_i], which backward needs.
  m.def(
      "lora_linear(Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor?[] biases, "
      "Tensor[] lora_A, Tensor[] lora_B, float[] scalings, float dropout_p, Tensor? seed) -> (Tensor[] outs, Tensor shrink)");
  // output_mask: [x, lora (A and B), weights (dense only), biases].
  m.def(
      "lora_linear_backward(Tensor[] grad_outs, Tensor x, Tensor shrink, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, "
      "Tensor[] lora_A, Tensor[] lora_B, float[] scalings, float dropout_p, Tensor? seed, "
      "bool[] output_mask) -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, "
      "Tensor[] grad_weights, Tensor[] grad_biases)");
  // The dropout-fused pieces of LoRA (device kernels; the mask is a hash of seed and index).
  m.def("lora_shrink_dropout(Tensor x, Tensor lora_A, float dropout_p, Tensor seed) -> Tensor");
  m.def("lora_grad_A_dropout(Tensor grad_shrink, Tensor x, float dropout_p, Tensor seed) -> Tensor");
  m.def(
      "lora_grad_x_dropout_accum_(Tensor(a!) grad_x, Tensor grad_shrink, Tensor lora_A, "
      "float dropout_p, Tensor seed) -> ()");

  // ---- Dropout, materialised (for a vendor GEMM on dropout(x)) ------------------------------------
  // x * mask / (1 - p) under the counter-based mask of seed (common/dropout_mask.h), element
  // indices row-major over x; the _add_ form accumulates it into out.
  m.def("dropout_apply(Tensor x, float dropout_p, Tensor seed) -> Tensor");
  m.def("dropout_apply_add_(Tensor(a!) out, Tensor x, float dropout_p, Tensor seed) -> ()");

  // ---- DoRA ---------------------------------------------------------------------------------------
  // peft's DoRA on one projection: with n = ||W + scaling B A||_row (detached) and x_d = dropout(x),
  //   out = x W^T + b + (m / n - 1) * (x_d W^T) + (m / n) * scaling * (x_d A^T) B^T,
  // which for dropout_p = 0 is (m / n) * (x W^T + scaling (x A^T) B^T) + b. Also returns what
  // backward needs: y = x_d W^T + scaling (x_d A^T) B^T [M, out], the shrink x_d A^T [M, r] and
  // the float32 norm n [out]. weight_sq_norm: ||W_row||^2 in float32 when the caller caches it
  // (None: computed from W here).
  m.def(
      "dora_linear(Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, Tensor magnitude, float scaling, float dropout_p, Tensor? seed, "
      "Tensor? weight_sq_norm) -> (Tensor out, Tensor y, Tensor shrink, Tensor weight_norm)");
  // output_mask: [x, adapter (lora_A, lora_B, magnitude), bias].
  m.def(
      "dora_linear_backward(Tensor grad_out, Tensor x, Tensor y, Tensor shrink, Tensor weight_norm, "
      "str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, float scaling, float dropout_p, Tensor? seed, bool[] output_mask) -> "
      "(Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_magnitude, Tensor grad_bias)");

  // ---- Fused linear cross-entropy (causal-LM heads) ---------------------------------------------
  // Row-wise part of one chunk, in place: loss[i] = lse(z_i) - z_i[labels[i]] and logits_i <-
  // grad_scale * (softmax(z_i) - onehot) * dz/dx, z = softcap * tanh(x / softcap) (softcap 0: z = x);
  // float32 math; rows labelled ignore_index get loss 0 and gradient 0.
  m.def(
      "cross_entropy_rows_(Tensor(a!) logits, Tensor labels, Tensor(b!) loss, float softcap, int ignore_index, "
      "float grad_scale) -> ()");
  // cross_entropy(hidden W^T + b + lora_scaling * (hidden A^T) B^T, labels) over chunks of tokens,
  // with its gradients: never a [tokens, vocab] tensor. W frozen, any format; output_mask:
  // [hidden, lora]. Returns the float32 loss and grad_hidden, grad_lora_A, grad_lora_B (empty when
  // not asked for), for reduction "mean" (over tokens not ignored) or "sum".
  m.def(
      "linear_cross_entropy(Tensor hidden, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, "
      "Tensor? bias, Tensor labels, Tensor? lora_A, Tensor? lora_B, float lora_scaling, int ignore_index, "
      "str reduction, float softcap, int chunk_tokens, bool[] output_mask) -> (Tensor loss, Tensor grad_hidden, "
      "Tensor grad_lora_A, Tensor grad_lora_B)");

  // ---- Sparse fine-tuning (FishMask / BitFit masks, sparse deltas) -----------------------------
  // Masks are sorted flat indices (int32/int64) per tensor; None means every entry. Kernels skip
  // indices outside the tensor; sortedness and uniqueness are checked where masks are built.
  //
  // AdamW on the masked entries only: exp_avgs / exp_avg_sqs are float32 with one entry per
  // trained entry; steps[i] is the (already incremented) step number of params[i]. grads are
  // divided by grad_scale; with found_inf != 0 nothing changes (AMP).
  m.def(
      "sparse_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] indices, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // out.flatten()[indices] += values, rounded once to out's dtype.
  m.def("sparse_delta_add_(Tensor(a!) out, Tensor indices, Tensor values) -> ()");
  // dequantize_4bit_ with values added to the listed elements before the rounding to out's dtype.
  m.def(
      "dequantize_4bit_add_delta_(Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, "
      "str quant_type, Tensor indices, Tensor values, Tensor(a!) out) -> ()");
  // float32 [k]: sum over tokens of grad_out[..., o_j] * x[..., i_j], (o_j, i_j) = divmod(indices[j], in).
  // Tokens go in chunks of chunk_tokens (0: as many as fit ~64 MiB of transposed copies).
  m.def("sparse_delta_weight_grad(Tensor grad_out, Tensor x, Tensor indices, int chunk_tokens=0) -> Tensor");
  // y = x (W + D)^T + b, D zero except D.flatten()[indices] = values; W frozen, any format.
  m.def(
      "sparse_delta_linear(Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor? bias, Tensor indices, "
      "Tensor values) -> Tensor");
  // output_mask: [x, values, bias].
  m.def(
      "sparse_delta_linear_backward(Tensor grad_out, Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, "
      "Tensor indices, Tensor values, bool[] output_mask) -> (Tensor grad_x, Tensor grad_values, Tensor grad_bias)");
  // y = x W^T + b whose weight gradient is computed at the sorted flat indices only (FishMask):
  // backward returns the dense masked gradient (zero off the mask) without the dense GEMM.
  m.def("masked_weight_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices) -> Tensor");
  // output_mask: [x, weight, bias].
  m.def(
      "masked_weight_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor indices, bool[] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // ---- Prefix-KV attention (prefix tuning, P-tuning v2) ------------------------------------------
  // out = softmax([q prefix_k[i]^T | mask(q k^T)] * scale) [prefix_v[i]; v] for example b with
  // i = prefix_index[b] (0 when None): q [B, H, Sq, D]; k, v [B, Hkv, Skv, D]; prefix_k/v, a bank of
  // N sets [N, Hkv, P, D]. attention_mask (bool = attend, or additive) and causality (aligned to
  // the last key) apply to the sequence keys only. Also returns the fp32 log-sum-exp [B, H, Sq].
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? attention_mask, bool causal, float? scale) -> (Tensor out, Tensor lse)");
  // output_mask: [q, k, v, prefix_k, prefix_v]; the bank gradients are summed per set.
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? attention_mask, Tensor out, Tensor lse, bool causal, float? scale, "
      "bool[] output_mask) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_prefix_k, "
      "Tensor grad_prefix_v)");
  // ---- Several LoRA adapters in one batch (multi-LoRA) -----------------------------------------
  // Row m of x uses adapter a(m) of the bank, or none (index -1):
  // out_m = x_m W^T + b + scalings[a] * (dropout_a(x_m) lora_A[a]^T) lora_B[a]^T.
  // The plan (sorted_rows, offsets) groups the rows by adapter; make it once per batch with
  // multi_lora_plan and pass it to every layer. Also returns the [M, max rank] shrink for backward.
  m.def(
      "multi_lora_plan(Tensor adapter_index, int rows, int num_adapters) -> "
      "(Tensor sorted_rows, Tensor offsets)");
  m.def(
      "multi_lora_linear(Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor? bias, Tensor[] lora_A, "
      "Tensor[] lora_B, float[] scalings, float[] dropout_p, Tensor? seed, Tensor sorted_rows, Tensor offsets) "
      "-> (Tensor out, Tensor shrink)");
  // output_mask: [x, weight (dense only), bias]; adapter_grads: per adapter, grads of its A and B.
  m.def(
      "multi_lora_linear_backward(Tensor grad_out, Tensor x, Tensor shrink, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, "
      "Tensor[] lora_A, Tensor[] lora_B, float[] scalings, float[] dropout_p, Tensor? seed, "
      "Tensor sorted_rows, Tensor offsets, bool[] output_mask, bool[] adapter_grads) -> "
      "(Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, Tensor grad_weight, Tensor grad_bias)");
  // ---- (IA)^3 and bottleneck adapters --------------------------------------------------
  // (IA)^3 scales activations by learned vectors. `vectors` is a bank [T, d] (float32 or x's
  // dtype); `task_ids` [B] picks each example's row (x is [B, ..., d]); None means one task (T = 1).
  m.def("ia3_scale(Tensor x, Tensor vectors, Tensor? task_ids) -> Tensor");
  m.def("ia3_scale_(Tensor(a!) x, Tensor vectors, Tensor? task_ids) -> ()");
  // saved is x, or the scaled output y when divide_by_vectors (then grad_vectors = sum(grad*y)/l).
  m.def(
      "ia3_scale_backward(Tensor grad, Tensor saved, Tensor vectors, Tensor? task_ids, "
      "bool divide_by_vectors, bool[] output_mask) -> (Tensor grad_x, Tensor grad_vectors)");
  // A frozen linear with (IA)^3: y = (x W^T + b) * l (output side: keys, values) or
  // y = (x * l) W^T + b (is_feedforward: the FFN intermediate). Backward saves y (output side)
  // or x (feed-forward); the base weight and bias are frozen.
  m.def(
      "ia3_linear(Tensor x, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, Tensor? bias, Tensor vectors, "
      "Tensor? task_ids, bool is_feedforward) -> Tensor");
  m.def(
      "ia3_linear_backward(Tensor grad_out, Tensor saved, str weight_format, Tensor?[] weight_tensors, int[] weight_ints, "
      "Tensor vectors, Tensor? task_ids, bool is_feedforward, bool[] output_mask) -> (Tensor grad_x, Tensor grad_vectors)");
  // 4-bit dequantize with a per-row (scale_dim 0) or per-column (scale_dim 1) factor folded in:
  // the single-task (IA)^3 fusion. out is the 2-D [rows, cols] weight buffer.
  m.def(
      "dequantize_4bit_scaled_(Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, "
      "str quant_type, Tensor scale, int scale_dim, Tensor(a!) out) -> ()");
  // Bottleneck adapters: a chain of n stages (n = 2 stacks a language then a task adapter, MAD-X);
  // stage i maps h to h + scaling_i * (act(LN_i(h) Wd_i^T + bd_i) Wu_i^T + bu_i), starting from
  // x with the residual `residual` (None: x). Stage weights are banks: Wd [N, r, d], bd [N, r],
  // Wu [N, d, r], bu [N, d]; adapter_ids[i] [B] picks each example's adapter (None: N = 1).
  // ln_weight / ln_bias are empty (no layer norm) or one [N, d] bank per stage; rational_coeffs is
  // one [N, 10] bank per stage for activation "rational" (adaptable adapters), else empty. `saved`
  // holds per stage the [M, r] pre-activation. output_mask: x, residual, adapter weights and
  // biases, layer norm, rational coefficients.
  m.def(
      "bottleneck_adapter(Tensor x, Tensor? residual, Tensor[] down_weight, Tensor[] down_bias, "
      "Tensor[] up_weight, Tensor[] up_bias, Tensor[] ln_weight, Tensor[] ln_bias, Tensor[] rational_coeffs, "
      "Tensor?[] adapter_ids, float[] scalings, str activation, float ln_eps) -> (Tensor out, Tensor[] saved)");
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor x, Tensor? residual, Tensor[] saved, "
      "Tensor[] down_weight, Tensor[] down_bias, Tensor[] up_weight, Tensor[] up_bias, "
      "Tensor[] ln_weight, Tensor[] ln_bias, Tensor[] rational_coeffs, Tensor?[] adapter_ids, float[] scalings, "
      "str activation, float ln_eps, bool[] output_mask) -> (Tensor grad_x, Tensor grad_residual, "
      "Tensor[] grad_down_weight, Tensor[] grad_down_bias, Tensor[] grad_up_weight, Tensor[] grad_up_bias, "
      "Tensor[] grad_ln_weight, Tensor[] grad_ln_bias, Tensor[] grad_rational_coeffs)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTPEFT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(FASTPEFT_BUILT_CUDA_ARCHS);
  info["cuda_version"] = std::string(FASTPEFT_BUILT_CUDA_VERSION);
  info["torch_version"] = std::string(FASTPEFT_BUILT_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft kernels; the operators live in torch.ops.fastpeft";
  m.def("build_info", &build_info,
        "What this build compiled: CUDA or CPU only, CUDA arches, CUDA and torch versions.");
  m.def("release_cpu_workspace", &fastpeft::release_cpu_workspace,
        "Free this thread's CPU buffer for dequantized 4-bit weights (it is re-created on demand).");
}
