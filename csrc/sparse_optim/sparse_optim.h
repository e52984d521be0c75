// Sparse-masked AdamW: Adam moments exist only for the trained entries of each parameter.
//
// A parameter is trained at sorted flat `indices` (int32 or int64), or at every entry when it has
// no indices (a BitFit bias, a dense classifier head, the values of a SparseDeltaLinear). Its
// exp_avg / exp_avg_sq are float32 vectors with one entry per trained entry, whatever the
// parameter's dtype; its gradient is the dense .grad that autograd produced.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "sparse_optim/adamw_math.h"

namespace fastpeft {

enum class IndexKind : int32_t { None = 0, Int32 = 1, Int64 = 2 };

// One parameter's update, as raw pointers: the CPU kernel walks a vector of these and the CUDA
// kernel copies the same bytes to the device, so the layout is plain data.
struct SparseAdamWTensor {
  void* param;              // [numel], the parameter dtype
  const void* grad;         // [numel], the parameter dtype
  const void* indices;      // [count] int32/int64, or nullptr: entry j is element j
  float* exp_avg;           // [count]
  float* exp_avg_sq;        // [count]
  const float* step;        // the step number this update uses (already incremented)
  int64_t count;            // trained entries
  int64_t numel;            // elements of the parameter; indices outside [0, numel) are skipped
  int64_t first_chunk;      // the kernel's first work chunk of this tensor (filled by the kernel)
  IndexKind index_kind;
  int32_t vector_aligned;   // 1 when indices / exp_avg / exp_avg_sq allow 16-byte loads
};

// Device kernels. All tensors of one call share the parameter dtype `dtype` and one device, and
// are validated by the op body (sparse_optim.cpp); grad_scale / found_inf may be absent.
void sparse_adamw_cpu_kernel(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
                             const float* grad_scale, const float* found_inf);
#ifdef FASTPEFT_WITH_CUDA
void sparse_adamw_cuda_kernel(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
                              const at::Tensor& grad_scale, const at::Tensor& found_inf, at::Device device);
#endif

}  // namespace fastpeft
