// Frozen base weights of the linear-layer ops (LoRA, multi-LoRA, (IA)^3, sparse deltas): a dense
// [O, K] tensor, a bitsandbytes 4-bit weight or (LoRA only, so far) a bitsandbytes int8 row-wise
// weight, built from op arguments and validated against the input x in one place, materialised as
// a dense tensor on demand (quantized weights are dequantized into the shared workspace and never
// kept).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "quant4bit/quant4bit.h"
#include "quant8bit/int8_rowwise.h"

namespace fastpeft {

// One frozen weight.
struct FrozenWeight {
  at::Tensor dense;         // [O, K]; undefined for a quantized weight
  Quant4bitWeight quant;    // valid when dense and int8.data are undefined
  Int8RowwiseWeight int8;   // valid when int8.data is defined
  int64_t out_features = 0;

  bool quantized() const { return !dense.defined(); }
  bool is_int8() const { return int8.data.defined(); }
  // W as a dense [O, K] tensor of `dtype`; a quantized weight lives in the shared workspace, valid
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
// data int8 [O, K], scale float32 [O] (bitsandbytes CB / SCB); errors name them `name` and
// `scale_name`.
FrozenWeight frozen_int8_weight(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale, const char* op,
                                const std::string& name, const std::string& scale_name);

// The frozen weights of n projections that share one input (all dense, all 4-bit or all int8).
struct FrozenWeights {
  std::vector<at::Tensor> dense;
  std::vector<Quant4bitWeight> quant;
  std::vector<Int8RowwiseWeight> int8;
  std::vector<int64_t> out_features;

  size_t size() const { return out_features.size(); }
  bool quantized() const { return !quant.empty() || !int8.empty(); }
  at::Tensor materialize(size_t i, int64_t in_features, at::ScalarType dtype, at::Device device) const;
};

// Append one frozen weight, validated as frozen_dense_weight / frozen_quant4bit_weight do.
void add_dense_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& weight, const char* op,
                      const std::string& name);
void add_quant4bit_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& nested_offset, int64_t out_features, int64_t blocksize,
                          int64_t nested_blocksize, Quant4bitType type, const char* op, const std::string& name);
void add_int8_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                     const char* op, const std::string& name, const std::string& scale_name);

}  // namespace fastpeft
