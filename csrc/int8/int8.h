// bitsandbytes LLM.int8() weights (Linear8bitLt with has_fp16_weights=False) as plain tensors.
//
// Layout, as bitsandbytes keeps it: `data` is the int8 [out_features, in_features] weight CB and
// `scale` the float32 [out_features] per-row absmax SCB; the weight is W[o, k] = CB[o, k] *
// SCB[o] / 127. fastpeft computes each element in float32 as (CB * SCB) / 127 (two IEEE roundings,
// no FMA, no reciprocal) and rounds once to the output dtype: bit-exact with
// `(CB.float() * SCB[:, None] / 127).to(dtype)`.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fastpeft {

struct Int8RowwiseWeight {
  at::Tensor data;   // int8 [out_features, in_features], contiguous
  at::Tensor scale;  // float32 [out_features], contiguous
};

// Validates data / scale for a weight with `in_features` columns (-1: any); errors name `op` and
// the arguments as `data_name` / `scale_name`.
Int8RowwiseWeight make_int8_rowwise_weight(const at::Tensor& data, const at::Tensor& scale, int64_t in_features,
                                           const char* op, const std::string& data_name,
                                           const std::string& scale_name);

// Writes the dequantized weight into `out` (contiguous, any float dtype, data's shape), through the
// dispatcher so the device's kernel runs.
void dequantize_int8_rowwise_into(const Int8RowwiseWeight& w, at::Tensor& out);

// Device kernels; arguments already validated, `out` contiguous and non-empty.
void dequantize_int8_rowwise_cpu_kernel(const Int8RowwiseWeight& w, at::Tensor& out);
#ifdef FASTPEFT_WITH_CUDA
void dequantize_int8_rowwise_cuda_kernel(const Int8RowwiseWeight& w, at::Tensor& out);
#endif

}  // namespace fastpeft
