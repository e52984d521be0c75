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

  // ---- LoRA -----------------------------------------------------------------------------------
  // out_i = x W_i^T + b_i + scaling_i * (dropout(x) A_i^T) B_i^T; also returns the shrink
  // dropout(x) [A_1; A_2; ...]^T of shape [M, sum r_i], which backward needs.
  m.def(
      "lora_linear(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] lora_A, Tensor[] lora_B, "
      "float[] scalings, float dropout_p, Tensor? seed) -> (Tensor[] outs, Tensor shrink)");
  m.def(
      "lora_linear_backward(Tensor[] grad_outs, Tensor x, Tensor shrink, Tensor[] weights, "
      "Tensor[] lora_A, Tensor[] lora_B, float[] scalings, float dropout_p, Tensor? seed, "
      "bool[] output_mask) -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, "
      "Tensor[] grad_weights, Tensor[] grad_biases)");
  m.def(
      "lora_linear_4bit(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] nested_absmax, "
      "Tensor?[] nested_code, Tensor?[] nested_offset, int[] out_features, int[] blocksizes, "
      "int[] nested_blocksizes, str quant_type, Tensor?[] biases, Tensor[] lora_A, Tensor[] lora_B, "
      "float[] scalings, float dropout_p, Tensor? seed) -> (Tensor[] outs, Tensor shrink)");
  m.def(
      "lora_linear_4bit_backward(Tensor[] grad_outs, Tensor x, Tensor shrink, Tensor[] packed, "
      "Tensor[] absmax, Tensor?[] nested_absmax, Tensor?[] nested_code, Tensor?[] nested_offset, "
      "int[] out_features, int[] blocksizes, int[] nested_blocksizes, str quant_type, "
      "Tensor[] lora_A, Tensor[] lora_B, float[] scalings, float dropout_p, Tensor? seed, "
      "bool[] output_mask) -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, "
      "Tensor[] grad_biases)");
  // The dropout-fused pieces of LoRA (device kernels; the mask is a hash of seed and index).
  m.def("lora_shrink_dropout(Tensor x, Tensor lora_A, float dropout_p, Tensor seed) -> Tensor");
  m.def("lora_grad_A_dropout(Tensor grad_shrink, Tensor x, float dropout_p, Tensor seed) -> Tensor");
  m.def(
      "lora_grad_x_dropout_accum_(Tensor(a!) grad_x, Tensor grad_shrink, Tensor lora_A, "
      "float dropout_p, Tensor seed) -> ()");

  // ---- (IA)^3 and bottleneck adapters (issue 3) --------------------------------------------------
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
      "ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor vectors, Tensor? task_ids, "
      "bool is_feedforward) -> Tensor");
  m.def(
      "ia3_linear_backward(Tensor grad_out, Tensor saved, Tensor weight, Tensor vectors, "
      "Tensor? task_ids, bool is_feedforward, bool[] output_mask) -> (Tensor grad_x, Tensor grad_vectors)");
  m.def(
      "ia3_linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int out_features, int blocksize, "
      "int nested_blocksize, str quant_type, Tensor? bias, Tensor vectors, Tensor? task_ids, "
      "bool is_feedforward) -> Tensor");
  m.def(
      "ia3_linear_4bit_backward(Tensor grad_out, Tensor saved, Tensor packed, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset, int out_features, "
      "int in_features, int blocksize, int nested_blocksize, str quant_type, Tensor vectors, Tensor? task_ids, "
      "bool is_feedforward, bool[] output_mask) -> (Tensor grad_x, Tensor grad_vectors)");
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
  // ln_weight / ln_bias are empty (no layer norm) or one [N, d] bank per stage. `saved` holds per
  // stage the [M, r] pre-activation and, with layer norm, its [M] mean and rstd (else empty).
  m.def(
      "bottleneck_adapter(Tensor x, Tensor? residual, Tensor[] down_weight, Tensor[] down_bias, "
      "Tensor[] up_weight, Tensor[] up_bias, Tensor[] ln_weight, Tensor[] ln_bias, "
      "Tensor?[] adapter_ids, float[] scalings, str activation, float ln_eps) -> (Tensor out, Tensor[] saved)");
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor x, Tensor? residual, Tensor[] saved, "
      "Tensor[] down_weight, Tensor[] down_bias, Tensor[] up_weight, Tensor[] up_bias, "
      "Tensor[] ln_weight, Tensor[] ln_bias, Tensor?[] adapter_ids, float[] scalings, str activation, "
      "float ln_eps, bool[] output_mask) -> (Tensor grad_x, Tensor grad_residual, Tensor[] grad_down_weight, "
      "Tensor[] grad_down_bias, Tensor[] grad_up_weight, Tensor[] grad_up_bias, Tensor[] grad_ln_weight, "
      "Tensor[] grad_ln_bias)");
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
