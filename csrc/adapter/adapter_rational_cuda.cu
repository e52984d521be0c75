// CUDA backward of the rational activation (adaptable adapters): dz = grad_a * R'(z) in place, and
// each row's 10 coefficient gradients summed by one warp (lanes stride the row, then a shuffle
// tree in a fixed order), written as [M, 10] float32 partials. The caller reduces the rows per bank
// with ia3_task_reduce (plain loads and stores, no atomics): the same bits on every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "adapter/adapter.h"
#include "adapter/adapter_rational.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
rational_backward_kernel(T* __restrict__ grad_a, const T* __restrict__ z, const T* __restrict__ coeffs,
                         const int64_t* __restrict__ ids, int64_t rows_per_example, int64_t num_banks,
                         float* __restrict__ row_grads, int64_t M, int64_t r) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t m = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); m < M; m += warps) {
    int64_t bank = 0;
    if (ids) {
      bank = ids[m / rows_per_example];
      CUDA_KERNEL_ASSERT(bank >= 0 && bank < num_banks && "fastpeft bottleneck_adapter: adapter_ids out of range");
    }
    float c[kRationalCoeffs], gc[kRationalCoeffs];
#pragma unroll
    for (int j = 0; j < kRationalCoeffs; ++j) {
      c[j] = static_cast<float>(coeffs[bank * kRationalCoeffs + j]);
      gc[j] = 0.0f;
    }
    for (int64_t k = lane; k < r; k += 32) {
      const int64_t i = m * r + k;
      grad_a[i] = static_cast<T>(rational_backward<float>(static_cast<float>(z[i]), static_cast<float>(grad_a[i]), c, gc));
    }
#pragma unroll
    for (int j = 0; j < kRationalCoeffs; ++j) {
      float v = gc[j];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) row_grads[m * kRationalCoeffs + j] = v;
    }
  }
}

}  // namespace

at::Tensor adapter_rational_backward_cuda(at::Tensor& grad_a, const at::Tensor& z, const at::Tensor& coeffs,
                                          const TaskMap& banks) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t M = z.size(0), r = z.size(1);
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && grad_a.is_contiguous() && coeffs.is_contiguous());
  auto row_grads = at::empty({M, kRationalCoeffs}, z.options().dtype(at::kFloat));
  if (M == 0) return row_grads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t warps_needed = (M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t blocks = warps_needed < int64_t(sms) * 16 ? warps_needed : int64_t(sms) * 16;
  const int64_t rows_per_example = banks.rows_per_example > 1 ? banks.rows_per_example : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_rational_backward_cuda", [&] {
    rational_backward_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_a.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), coeffs.data_ptr<scalar_t>(), banks.ids_ptr(),
        rows_per_example, banks.num_tasks, row_grads.data_ptr<float>(), M, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return row_grads;
}

}  // namespace fastpeft
