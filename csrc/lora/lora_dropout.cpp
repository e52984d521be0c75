// Op bodies of the dropout-fused LoRA pieces: validate, then run the device kernel. The mask is
// never stored: every kernel recomputes it from (seed, element index), see common/dropout_mask.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "lora/lora.h"

namespace fastpeft {

namespace {

constexpr const char* kShrinkOp = "fastpeft.lora_shrink_dropout";
constexpr const char* kGradAOp = "fastpeft.lora_grad_A_dropout";
constexpr const char* kGradXOp = "fastpeft.lora_grad_x_dropout_accum_";

void check_matrix(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  check_float(t, op, name);
  check_dim(t, 2, op, name);
  check_dtype(t, like.scalar_type(), op, name, " (the dtype of x)");
  check_same_device(t, like, op, name, "x");
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const DropoutMask&)>
at::Tensor shrink_dropout(const at::Tensor& x, const at::Tensor& lora_A, double p, const at::Tensor& seed) {
  check_matrix(x, x, kShrinkOp, "x");
  check_matrix(lora_A, x, kShrinkOp, "lora_A");
  TORCH_CHECK(lora_A.size(1) == x.size(1), kShrinkOp, ": lora_A must be [r, ", x.size(1),
              "] to match x [M, ", x.size(1), "], got ", lora_A.sizes());
  const auto mask = dropout_mask_from(p, seed, kShrinkOp);
  // Empty in any dimension (K = 0 included: an empty sum is 0) never reaches a kernel.
  if (x.numel() == 0 || lora_A.size(0) == 0) return at::zeros({x.size(0), lora_A.size(0)}, x.options());
  return Kernel(x.contiguous(), lora_A.contiguous(), mask);
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const DropoutMask&)>
at::Tensor grad_A_dropout(const at::Tensor& grad_shrink, const at::Tensor& x, double p, const at::Tensor& seed) {
  check_matrix(x, x, kGradAOp, "x");
  check_matrix(grad_shrink, x, kGradAOp, "grad_shrink");
  TORCH_CHECK(grad_shrink.size(0) == x.size(0), kGradAOp, ": grad_shrink must be [", x.size(0),
              ", r] to match x [", x.size(0), ", K], got ", grad_shrink.sizes());
  const auto mask = dropout_mask_from(p, seed, kGradAOp);
  if (x.size(0) == 0 || grad_shrink.size(1) == 0 || x.size(1) == 0)
    return at::zeros({grad_shrink.size(1), x.size(1)}, x.options());
  return Kernel(grad_shrink.contiguous(), x.contiguous(), mask);
}

template <void (*Kernel)(at::Tensor&, const at::Tensor&, const at::Tensor&, const DropoutMask&)>
void grad_x_dropout_accum_(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                           double p, const at::Tensor& seed) {
  check_matrix(grad_x, grad_x, kGradXOp, "grad_x");
  TORCH_CHECK(grad_x.is_contiguous(), kGradXOp, ": grad_x must be contiguous (it is updated in place)");
  check_matrix(grad_shrink, grad_x, kGradXOp, "grad_shrink");
  check_matrix(lora_A, grad_x, kGradXOp, "lora_A");
  TORCH_CHECK(grad_shrink.size(0) == grad_x.size(0) && lora_A.size(1) == grad_x.size(1) &&
                  grad_shrink.size(1) == lora_A.size(0),
              kGradXOp, ": expected grad_x [M, K], grad_shrink [M, r], lora_A [r, K], got ",
              grad_x.sizes(), ", ", grad_shrink.sizes(), ", ", lora_A.sizes());
  const auto mask = dropout_mask_from(p, seed, kGradXOp);
  if (grad_x.numel() == 0 || lora_A.size(0) == 0) return;
  Kernel(grad_x, grad_shrink.contiguous(), lora_A.contiguous(), mask);
}

}  // namespace

at::Tensor lora_grad_A_dropout_call(const at::Tensor& grad_shrink, const at::Tensor& x, double p,
                                    const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::lora_grad_A_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  return op.call(grad_shrink, x, p, seed);
}

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_shrink_dropout", &shrink_dropout<lora_shrink_dropout_cpu>);
  m.impl("lora_grad_A_dropout", &grad_A_dropout<lora_grad_A_dropout_cpu>);
  m.impl("lora_grad_x_dropout_accum_", &grad_x_dropout_accum_<lora_grad_x_dropout_accum_cpu>);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_shrink_dropout", &shrink_dropout<lora_shrink_dropout_cuda>);
  m.impl("lora_grad_A_dropout", &grad_A_dropout<lora_grad_A_dropout_cuda>);
  m.impl("lora_grad_x_dropout_accum_", &grad_x_dropout_accum_<lora_grad_x_dropout_accum_cuda>);
}
#endif

}  // namespace fastpeft
