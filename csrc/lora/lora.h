// LoRA: shared declarations of the composite forward/backward and the dropout-fused kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "common/dropout_seed.h"
#include "common/frozen_weights.h"
#include "quant4bit/quant4bit.h"

namespace fastpeft {

// Dropout-fused kernels. Shapes: x [M, K], lora_A [R, K], grad_shrink [M, R], grad_x [M, K]; all
// contiguous, one float dtype, validated by the op bodies in lora_dropout.cpp.
at::Tensor lora_shrink_dropout_cpu(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask);
at::Tensor lora_grad_A_dropout_cpu(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask);
void lora_grad_x_dropout_accum_cpu(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                   const DropoutMask& mask);
// grad_shrink^T dropout(x) through the dispatcher (the device's lora_grad_A_dropout kernel): the
// LoRA A gradient under the seed's mask, for the composite ops (LoRA, DoRA).
at::Tensor lora_grad_A_dropout_call(const at::Tensor& grad_shrink, const at::Tensor& x, double p,
                                    const at::Tensor& seed);

#ifdef FASTPEFT_WITH_CUDA
at::Tensor lora_shrink_dropout_cuda(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask);
at::Tensor lora_grad_A_dropout_cuda(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask);
void lora_grad_x_dropout_accum_cuda(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                    const DropoutMask& mask);
#endif

}  // namespace fastpeft
