// LoRA: shared declarations of the composite forward/backward and the dropout-fused kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "common/dropout_mask.h"
#include "quant4bit/quant4bit.h"

namespace fastpeft {

// The frozen base weights of n projections that share one input: either dense [O_i, K] tensors
// or bitsandbytes 4-bit weights, which are dequantized on demand and never kept.
struct FrozenWeights {
  std::vector<at::Tensor> dense;
  std::vector<Quant4bitWeight> quant;
  std::vector<int64_t> out_features;

  size_t size() const { return out_features.size(); }
  bool quantized() const { return !quant.empty(); }
  // W_i as a dense [O_i, K] tensor of `dtype`; for 4-bit weights it lives in the shared
  // workspace, valid until the next materialize() on this thread.
  at::Tensor materialize(size_t i, int64_t in_features, at::ScalarType dtype, at::Device device) const;
};

// Append one frozen weight for an input x [..., K], checked against x (dtype, device, shape);
// errors name `op` and the argument as `name`. Shared by every op that takes frozen weights.
void add_dense_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& weight, const char* op,
                      const std::string& name);
void add_quant4bit_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& nested_offset, int64_t out_features, int64_t blocksize,
                          int64_t nested_blocksize, Quant4bitType type, const char* op, const std::string& name);

// Dropout-fused kernels. Shapes: x [M, K], lora_A [R, K], grad_shrink [M, R], grad_x [M, K]; all
// contiguous, one float dtype, validated by the op bodies in lora_dropout.cpp.
at::Tensor lora_shrink_dropout_cpu(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask);
at::Tensor lora_grad_A_dropout_cpu(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask);
void lora_grad_x_dropout_accum_cpu(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                   const DropoutMask& mask);
#ifdef FASTPEFT_WITH_CUDA
at::Tensor lora_shrink_dropout_cuda(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask);
at::Tensor lora_grad_A_dropout_cuda(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask);
void lora_grad_x_dropout_accum_cuda(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                    const DropoutMask& mask);
#endif

// Reads the dropout seed (an int64 tensor of one element) and builds the mask.
DropoutMask dropout_mask_from(double p, const at::Tensor& seed, const char* op);

}  // namespace fastpeft
