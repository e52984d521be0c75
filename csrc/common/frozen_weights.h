// Frozen base weights of the linear-layer ops (LoRA, multi-LoRA, (IA)^3, sparse deltas): a dense
// [O, K] tensor or a bitsandbytes 4-bit weight, built from op arguments and validated against the
// input x in one place, materialised as a dense tensor on demand (4-bit weights are dequantized
// into the shared workspace and never kept).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "quant4bit/quant4bit.h"

namespace fastpeft {

// One frozen weight.
struct FrozenWeight {
  at::Tensor dense;       // [O, K]; undefined for a 4-bit weight
  Quant4bitWeight quant;  // valid when dense is undefined
  int64_t out_features = 0;

  bool quantized() const { return !dense.defined(); }
  // W as a dense [O, K] tensor of `dtype`; a 4-bit weight lives in the shared workspace, valid
  // until the next dequantization into it on this thread.
  at::Tensor materialize(int64_t in_features, at::ScalarType dtype, at::Device device) const;
};

// A frozen weight for an input x [..., K], checked against x (dtype, device, shape); errors name
// `op` and the argument as `name`.
FrozenWeight frozen_dense_weight(const at::Tensor& x, const at::Tensor& weight, const char* op,
                                 const std::string& name);
FrozenWeight frozen_quant4bit_weight(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code,
                                     const c10::optional<at::Tensor>& nested_offset, int64_t out_features,
                                     int64_t blocksize, int64_t nested_blocksize, Quant4bitType type, const char* op,
                                     const std::string& name);

// The frozen weights of n projections that share one input (all dense or all 4-bit).
struct FrozenWeights {
  std::vector<at::Tensor> dense;
  std::vector<Quant4bitWeight> quant;
  std::vector<int64_t> out_features;

  size_t size() const { return out_features.size(); }
  bool quantized() const { return !quant.empty(); }
  at::Tensor materialize(size_t i, int64_t in_features, at::ScalarType dtype, at::Device device) const;
};

// Append one frozen weight, validated as frozen_dense_weight / frozen_quant4bit_weight do.
void add_dense_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& weight, const char* op,
                      const std::string& name);
void add_quant4bit_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& nested_offset, int64_t out_features, int64_t blocksize,
                          int64_t nested_blocksize, Quant4bitType type, const char* op, const std::string& name);

}  // namespace fastpeft
