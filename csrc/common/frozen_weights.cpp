// Frozen base weights: validation against x and on-demand materialisation (see frozen_weights.h).
#include "common/frozen_weights.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/workspace.h"

namespace fastpeft {

at::Tensor FrozenWeight::materialize(int64_t in_features, at::ScalarType dtype, at::Device device) const {
  if (!quantized()) return dense;
  auto w = dequant_workspace(out_features * in_features, dtype, device).view({out_features, in_features});
  if (is_int8()) {
    dequantize_int8_rowwise_into(int8, w);
  } else {
    dequantize_4bit_into(quant, w);
  }
  return w;
}

FrozenWeight frozen_dense_weight(const at::Tensor& x, const at::Tensor& weight, const char* op,
                                 const std::string& name) {
  check_dim(weight, 2, op, name);
  check_dtype(weight, x.scalar_type(), op, name, " (the dtype of x)");
  check_same_device(weight, x, op, name, "x");
  TORCH_CHECK(weight.size(1) == x.size(-1), op, ": ", name, " must be [out_features, ", x.size(-1),
              "] to match x, got ", weight.sizes());
  FrozenWeight w;
  w.dense = weight;
  w.out_features = weight.size(0);
  return w;
}

FrozenWeight frozen_quant4bit_weight(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code,
                                     const c10::optional<at::Tensor>& nested_offset, int64_t out_features,
                                     int64_t blocksize, int64_t nested_blocksize, Quant4bitType type, const char* op,
                                     const std::string& name) {
  check_same_device(packed, x, op, name, "x");
  TORCH_CHECK(out_features >= 1, op, ": out_features of ", name, " must be >= 1, got ", out_features);
  FrozenWeight w;
  w.quant = make_quant4bit_weight(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                  nested_blocksize, type, out_features * x.size(-1), op);
  w.out_features = out_features;
  return w;
}

FrozenWeight frozen_int8_weight(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale, const char* op,
                                const std::string& name, const std::string& scale_name) {
  if (data.defined()) check_same_device(data, x, op, name, "x");
  FrozenWeight w;
  w.int8 = make_int8_rowwise_weight(data, scale, x.size(-1), op, name, scale_name);
  w.out_features = data.size(0);
  return w;
}

at::Tensor FrozenWeights::materialize(size_t i, int64_t in_features, at::ScalarType dtype, at::Device device) const {
  FrozenWeight w;
  if (!int8.empty()) {
    w.int8 = int8[i];
  } else if (quantized()) {
    w.quant = quant[i];
  } else {
    w.dense = dense[i];
  }
  w.out_features = out_features[i];
  return w.materialize(in_features, dtype, device);
}

void add_dense_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& weight, const char* op,
                      const std::string& name) {
  auto w = frozen_dense_weight(x, weight, op, name);
  W.dense.push_back(w.dense);
  W.out_features.push_back(w.out_features);
}

void add_quant4bit_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& nested_offset, int64_t out_features, int64_t blocksize,
                          int64_t nested_blocksize, Quant4bitType type, const char* op, const std::string& name) {
  auto w = frozen_quant4bit_weight(x, packed, absmax, nested_absmax, nested_code, nested_offset, out_features,
                                   blocksize, nested_blocksize, type, op, name);
  W.quant.push_back(w.quant);
  W.out_features.push_back(w.out_features);
}

void add_int8_weight(FrozenWeights& W, const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                     const char* op, const std::string& name, const std::string& scale_name) {
  auto w = frozen_int8_weight(x, data, scale, op, name, scale_name);
  W.int8.push_back(w.int8);
  W.out_features.push_back(w.out_features);
}

}  // namespace fastpeft
