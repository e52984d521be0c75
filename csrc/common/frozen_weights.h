// The frozen base weight of every linear op family (LoRA and its projection groups, multi-LoRA,
// (IA)^3, sparse deltas), in one argument triple that every such op takes:
//
//   str weight_format, Tensor?[] weight_tensors, int[] weight_ints
//
// describing n weights of one format, laid out weight after weight:
//
//   format         tensors per weight                                              ints per weight
//   "dense"        weight [O, K] (x's dtype)                                        -
//   "nf4" / "fp4"  packed, absmax, nested_absmax?, nested_code?, nested_offset?     O, K, blocksize, nested_blocksize
//   "int8"         data int8 [O, K] (bitsandbytes CB), scale float32 [O] (SCB)      -
//
// Python builds the triple with fastpeft.quant.frozen_weight_args. parse_frozen_weights validates it
// once per call; the kernels then see a FrozenWeight, which materialises W as a dense [O, K] tensor
// on demand (a quantized weight is dequantized into the shared workspace and never kept). A new
// base format (FP8, HQQ, GPTQ ...) is one more row here and one more branch in materialize().
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

#include "quant4bit/quant4bit.h"
#include "int8/int8.h"

namespace fastpeft {

using OptTensorList = c10::List<c10::optional<at::Tensor>>;

enum class WeightFormat { Dense, Quant4bit, Int8 };

// One frozen weight.
struct FrozenWeight {
  WeightFormat format = WeightFormat::Dense;
  at::Tensor dense;        // Dense: [O, K]
  Quant4bitWeight quant;   // Quant4bit
  Int8RowwiseWeight int8;  // Int8
  int64_t out_features = 0;
  int64_t in_features = 0;

  bool quantized() const { return format != WeightFormat::Dense; }
  bool is_4bit() const { return format == WeightFormat::Quant4bit; }
  // W as a dense [O, K] tensor of `dtype` on `device`; a quantized weight lives in the shared
  // workspace, valid until the next dequantization into it on this thread.
  at::Tensor materialize(at::ScalarType dtype, at::Device device) const;
};

// The weights of one op call (n >= 1 projections sharing an input, or one base weight).
struct FrozenWeights {
  WeightFormat format = WeightFormat::Dense;
  std::vector<FrozenWeight> items;

  size_t size() const { return items.size(); }
  const FrozenWeight& operator[](size_t i) const { return items[i]; }
  bool quantized() const { return format != WeightFormat::Dense; }
  at::Tensor materialize(size_t i, at::ScalarType dtype, at::Device device) const {
    return items[i].materialize(dtype, device);
  }
};

// How many entries of weight_tensors / weight_ints one weight of `format` takes.
size_t tensors_per_weight(WeightFormat format);
size_t ints_per_weight(WeightFormat format);
WeightFormat parse_weight_format(c10::string_view format, const char* op);

// Validates the triple. `like` is the tensor the weights must agree with (x in forward; x or the
// saved activation in backward): every tensor on its device, a dense weight of its dtype.
// `in_features` is the K every weight must have (-1: any). Errors name `op`, the entry of
// weight_tensors / weight_ints and which part of which weight it is.
FrozenWeights parse_frozen_weights(c10::string_view format, const OptTensorList& tensors, at::IntArrayRef ints,
                                   const at::Tensor& like, int64_t in_features, const char* op);

// The same for ops over exactly one base weight (named "weight" in errors).
FrozenWeight parse_frozen_weight(c10::string_view format, const OptTensorList& tensors, at::IntArrayRef ints,
                                 const at::Tensor& like, int64_t in_features, const char* op);

}  // namespace fastpeft
