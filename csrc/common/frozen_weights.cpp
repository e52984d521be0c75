// Frozen base weights: the op argument triple parsed and validated once, materialised on demand
// (see frozen_weights.h).
#include "common/frozen_weights.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/workspace.h"

namespace fastpeft {

namespace {

// What one weight's entries of weight_tensors are, for error messages.
const char* tensor_layout(WeightFormat format) {
  switch (format) {
    case WeightFormat::Dense:
      return "the weight";
    case WeightFormat::Quant4bit:
      return "packed, absmax, nested_absmax, nested_code, nested_offset (the last three None unless double-quantized)";
    case WeightFormat::Int8:
      return "data, scale (every int8 weight needs one scale)";
  }
  return "";
}

at::Tensor required(const OptTensorList& tensors, size_t j, const char* op, const std::string& what) {
  const c10::optional<at::Tensor> t = tensors[j];
  TORCH_CHECK(t.has_value() && t->defined(), op, ": weight_tensors[", j, "] (", what, ") is required, got None");
  return *t;
}

c10::optional<at::Tensor> optional_entry(const OptTensorList& tensors, size_t j) {
  const c10::optional<at::Tensor> t = tensors[j];
  return (t.has_value() && t->defined()) ? t : c10::nullopt;
}

FrozenWeight parse_dense(const OptTensorList& tensors, size_t j, const at::Tensor& like, int64_t in_features,
                         const char* op, const std::string& name) {
  const auto weight = required(tensors, j, op, name);
  check_dim(weight, 2, op, name);
  check_dtype(weight, like.scalar_type(), op, name, " (the dtype of x)");
  check_same_device(weight, like, op, name, "x");
  if (in_features >= 0) {
    TORCH_CHECK(weight.size(1) == in_features, op, ": ", name, " must be [out_features, ", in_features,
                "] to match x, got ", weight.sizes());
  }
  FrozenWeight w;
  w.format = WeightFormat::Dense;
  w.dense = weight;
  w.out_features = weight.size(0);
  w.in_features = weight.size(1);
  return w;
}

FrozenWeight parse_4bit(Quant4bitType type, const OptTensorList& tensors, size_t j, at::IntArrayRef ints, size_t k,
                        const at::Tensor& like, int64_t in_features, const char* op, const std::string& name) {
  const int64_t O = ints[k], K = ints[k + 1], blocksize = ints[k + 2], nested_blocksize = ints[k + 3];
  TORCH_CHECK(O >= 1 && K >= 0, op, ": weight_ints[", k, "], [", k + 1, "] (the shape of ", name,
              ") must be out_features >= 1 and in_features >= 0, got ", O, ", ", K);
  if (in_features >= 0) {
    TORCH_CHECK(K == in_features, op, ": ", name, " is [", O, ", ", K, "] (weight_ints[", k + 1,
                "]) but x has ", in_features, " features");
  }
  const auto packed = required(tensors, j, op, "packed of " + name);
  const auto absmax = required(tensors, j + 1, op, "absmax of " + name);
  check_same_device(packed, like, op, "packed of " + name, "x");
  FrozenWeight w;
  w.format = WeightFormat::Quant4bit;
  w.quant = make_quant4bit_weight(packed, absmax, optional_entry(tensors, j + 2), optional_entry(tensors, j + 3),
                                  optional_entry(tensors, j + 4), blocksize, nested_blocksize, type, O * K, op);
  w.out_features = O;
  w.in_features = K;
  return w;
}

FrozenWeight parse_int8(const OptTensorList& tensors, size_t j, const at::Tensor& like, int64_t in_features,
                        const char* op, const std::string& name, const std::string& scale_name) {
  const auto data = required(tensors, j, op, name);
  const auto scale = required(tensors, j + 1, op, scale_name);
  check_same_device(data, like, op, name, "x");
  FrozenWeight w;
  w.format = WeightFormat::Int8;
  w.int8 = make_int8_rowwise_weight(data, scale, in_features, op, name, scale_name);
  w.out_features = data.size(0);
  w.in_features = data.size(1);
  return w;
}

}  // namespace

at::Tensor FrozenWeight::materialize(at::ScalarType dtype, at::Device device) const {
  if (format == WeightFormat::Dense) return dense;
  auto w = dequant_workspace(out_features * in_features, dtype, device).view({out_features, in_features});
  if (format == WeightFormat::Int8) {
    dequantize_int8_rowwise_into(int8, w);
  } else {
    dequantize_4bit_into(quant, w);
  }
  return w;
}

size_t tensors_per_weight(WeightFormat format) {
  switch (format) {
    case WeightFormat::Dense:
      return 1;
    case WeightFormat::Quant4bit:
      return 5;
    case WeightFormat::Int8:
      return 2;
  }
  return 0;
}

size_t ints_per_weight(WeightFormat format) { return format == WeightFormat::Quant4bit ? 4 : 0; }

WeightFormat parse_weight_format(c10::string_view format, const char* op) {
  if (format == "dense") return WeightFormat::Dense;
  if (format == "nf4" || format == "fp4") return WeightFormat::Quant4bit;
  if (format == "int8") return WeightFormat::Int8;
  TORCH_CHECK(false, op, ": weight_format must be 'dense', 'nf4', 'fp4' or 'int8', got '", std::string(format), "'");
}

namespace {

FrozenWeights parse_weights(c10::string_view format_name, const OptTensorList& tensors, at::IntArrayRef ints,
                            const at::Tensor& like, int64_t in_features, const char* op, bool single) {
  const auto format = parse_weight_format(format_name, op);
  const size_t per_t = tensors_per_weight(format), per_i = ints_per_weight(format);
  const size_t n = tensors.size() / per_t;
  TORCH_CHECK(n >= 1 && tensors.size() % per_t == 0, op, ": weight_tensors holds ", tensors.size(),
              " tensors, but a '", std::string(format_name), "' weight takes ", per_t, " (", tensor_layout(format),
              "); expected ", single ? "exactly " : "a positive multiple of ", per_t);
  TORCH_CHECK(!single || n == 1, op, ": this op takes one base weight, got ", n);
  TORCH_CHECK(ints.size() == n * per_i, op, ": weight_ints holds ", ints.size(), " values, but ", n, " '",
              std::string(format_name), "' weight", n == 1 ? "" : "s", " take ", n * per_i,
              per_i ? " (out_features, in_features, blocksize, nested_blocksize per weight)" : "");
  const Quant4bitType type = format == WeightFormat::Quant4bit ? parse_quant_type(std::string(format_name), op)
                                                                : Quant4bitType::NF4;
  FrozenWeights W;
  W.format = format;
  W.items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string name = single ? "weight" : "weights" + idx;
    switch (format) {
      case WeightFormat::Dense:
        W.items.push_back(parse_dense(tensors, i, like, in_features, op, name));
        break;
      case WeightFormat::Quant4bit:
        W.items.push_back(parse_4bit(type, tensors, i * per_t, ints, i * per_i, like, in_features, op, name));
        break;
      case WeightFormat::Int8:
        W.items.push_back(parse_int8(tensors, i * per_t, like, in_features, op, name, single ? "scale" : "scales" + idx));
        break;
    }
  }
  return W;
}

}  // namespace

FrozenWeights parse_frozen_weights(c10::string_view format, const OptTensorList& tensors, at::IntArrayRef ints,
                                   const at::Tensor& like, int64_t in_features, const char* op) {
  return parse_weights(format, tensors, ints, like, in_features, op, /*single=*/false);
}

FrozenWeight parse_frozen_weight(c10::string_view format, const OptTensorList& tensors, at::IntArrayRef ints,
                                 const at::Tensor& like, int64_t in_features, const char* op) {
  return parse_weights(format, tensors, ints, like, in_features, op, /*single=*/true).items[0];
}

}  // namespace fastpeft
