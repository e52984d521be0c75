// Sparse deltas on frozen weights: W_eff = W + D, where D is zero except at sorted flat indices
// (int32 or int64, row-major into W's [out_features, in_features]) that hold `values`.
//
// D is never a dense tensor. Forward writes W (dense copy or 4-bit dequantization) into the shared
// workspace and adds D there before the single rounding to the compute dtype; backward needs dL/dD
// only at the indices, a sampled dense-dense product of grad_out and x over the tokens.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastpeft {

// Device kernels; arguments are validated by the op bodies in sparse_delta_ops.cpp.
//
// out.flatten()[indices[j]] = round(float(out.flatten()[indices[j]]) + values[j]); values float32.
void sparse_delta_add_cpu(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values);
// acc[j] += dot(grad_t[indices[j] / in_features], x_t[indices[j] % in_features]) over the row
// length: grad_t [out_features, L] and x_t [in_features, L] are transposed token chunks of one
// dtype, acc is float32 [k].
void sparse_delta_rows_dot_accum_cpu(at::Tensor& acc, const at::Tensor& grad_t, const at::Tensor& x_t,
                                     const at::Tensor& indices);
#ifdef FASTPEFT_WITH_CUDA
void sparse_delta_add_cuda(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values);
void sparse_delta_rows_dot_accum_cuda(at::Tensor& acc, const at::Tensor& grad_t, const at::Tensor& x_t,
                                      const at::Tensor& indices);
#endif

// Validates (indices, values) as a delta of a weight with `numel` elements on `device`; returns
// the values as contiguous float32 (what every kernel reads) and contiguous indices.
std::pair<at::Tensor, at::Tensor> checked_delta(const at::Tensor& indices, const at::Tensor& values, int64_t numel,
                                                const at::Device& device, const char* op);

// The building-block ops called through the dispatcher (any device), for the composite op bodies
// (sparse_delta.cpp, csrc/masked_linear/): fastpeft::sparse_delta_add_ and
// fastpeft::sparse_delta_weight_grad with automatic token chunks; the weight gradient is float32 [k].
void call_sparse_delta_add(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values);
at::Tensor call_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices);

}  // namespace fastpeft
