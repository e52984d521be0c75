// Frozen base weights of the LoRA-style ops: built from op arguments (validated against x) and
// materialised as dense tensors on demand (4-bit weights into the shared dequant workspace).
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/workspace.h"
#include "lora/lora.h"

namespace fastpeft {

at::Tensor FrozenWeights::materialize(size_t i, int64_t in_features, at::ScalarType dtype, at::Device device) const {
  if (!quantized()) return dense[i];
  auto w = dequant_workspace(out_features[i] * in_features, dtype, device).view({out_features[i], in_features});
  dequantize_4bit_into(quant[i], w);
  return w;
}

void add_dense_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& weight, const char* op,
                      const std::string& name) {
  check_dim(weight, 2, op, name);
  check_dtype(weight, x.scalar_type(), op, name, " (the dtype of x)");
  check_same_device(weight, x, op, name, "x");
  TORCH_CHECK(weight.size(1) == x.size(-1), op, ": ", name, " must be [out_features, ", x.size(-1),
              "] to match x, got ", weight.sizes());
  W.dense.push_back(weight);
  W.out_features.push_back(weight.size(0));
}

void add_quant4bit_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& nested_offset, int64_t out_features, int64_t blocksize,
                          int64_t nested_blocksize, Quant4bitType type, const char* op, const std::string& name) {
  check_same_device(packed, x, op, name, "x");
  TORCH_CHECK(out_features >= 1, op, ": out_features of ", name, " must be >= 1, got ", out_features);
  W.quant.push_back(make_quant4bit_weight(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                          nested_blocksize, type, out_features * x.size(-1), op));
  W.out_features.push_back(out_features);
}

}  // namespace fastpeft
