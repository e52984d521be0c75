// bitsandbytes int8 row-wise weights: validation and the dequantize op (see int8.h).
#include "int8/int8.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace fastpeft {

Int8RowwiseWeight make_int8_rowwise_weight(const at::Tensor& data, const at::Tensor& scale, int64_t in_features,
                                           const char* op, const std::string& data_name,
                                           const std::string& scale_name) {
  TORCH_CHECK(data.defined(), op, ": ", data_name, " is required");
  TORCH_CHECK(scale.defined(), op, ": ", scale_name, " is required");
  check_dtype(data, at::kChar, op, data_name, " (bitsandbytes' int8 weight CB)");
  check_dim(data, 2, op, data_name);
  if (in_features >= 0) {
    TORCH_CHECK(data.size(1) == in_features, op, ": ", data_name, " must be [out_features, ", in_features,
                "] to match x, got ", data.sizes());
  }
  check_dtype(scale, at::kFloat, op, scale_name, " (bitsandbytes' per-row absmax SCB)");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == data.size(0), op, ": ", scale_name, " must be [", data.size(0),
              "] (one scale per row of ", data_name, "), got ", scale.sizes());
  check_same_device(scale, data, op, scale_name, data_name.c_str());
  return {data.contiguous(), scale.contiguous()};
}

void dequantize_int8_rowwise_into(const Int8RowwiseWeight& w, at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dequantize_int8_rowwise_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  op.call(w.data, w.scale, out);
}

namespace {

using Kernel = void (*)(const Int8RowwiseWeight&, at::Tensor&);

template <Kernel K>
void dequantize_int8_rowwise_(const at::Tensor& data, const at::Tensor& scale, at::Tensor& out) {
  constexpr const char* op = "fastpeft.dequantize_int8_rowwise_";
  const auto w = make_int8_rowwise_weight(data, scale, -1, op, "data", "scale");
  check_float(out, op, "out");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is the buffer the weight is written to)");
  TORCH_CHECK(out.sizes() == data.sizes(), op, ": out must have data's shape ", data.sizes(), ", got ", out.sizes());
  check_same_device(out, data, op, "out", "data");
  if (out.numel() == 0) return;
  K(w, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("dequantize_int8_rowwise_", &dequantize_int8_rowwise_<dequantize_int8_rowwise_cpu_kernel>);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("dequantize_int8_rowwise_", &dequantize_int8_rowwise_<dequantize_int8_rowwise_cuda_kernel>);
}
#endif

}  // namespace fastpeft
