// CUDA kernels of the bottleneck adapter: the down-projection epilogue (bias + activation, and the
// ones column that lets the up GEMM add its bias) and the activation backward. Both touch only the
// r-wide tensors; the d-wide work is in the GEMMs. The rational activation's backward, which also
// reduces the coefficient gradients, is in adapter_rational_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "adapter/adapter.h"
#include "adapter/adapter_activation.h"
#include "adapter/adapter_rational.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
down_epilogue_kernel(T* z, const T* __restrict__ bias, const int64_t* __restrict__ ids, int64_t rows_per_example,
                     int64_t num_banks, T* __restrict__ a_aug, int64_t M, int64_t r, int64_t r_pad,
                     AdapterActivation act, const T* __restrict__ coeffs) {
  const int64_t total = M * r_pad;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / r_pad;
    const int64_t k = i - m * r_pad;
    T out;
    if (k < r) {
      float v = static_cast<float>(z[m * r + k]);
      int64_t bank = 0;
      if (ids && (bias || coeffs)) {
        bank = ids[m / rows_per_example];
        CUDA_KERNEL_ASSERT(bank >= 0 && bank < num_banks && "fastpeft bottleneck_adapter: adapter_ids out of range");
      }
      if (bias) {
        const T zb = static_cast<T>(v + static_cast<float>(bias[bank * r + k]));
        z[m * r + k] = zb;
        v = static_cast<float>(zb);
      }
      if (coeffs) {  // rational: this adapter's 10 coefficients (L1-resident: every row of a bank reads them)
        float c[kRationalCoeffs];
#pragma unroll
        for (int j = 0; j < kRationalCoeffs; ++j) c[j] = static_cast<float>(coeffs[bank * kRationalCoeffs + j]);
        out = static_cast<T>(rational_value<float>(v, c));
      } else {
        out = static_cast<T>(adapter_act(v, act));
      }
    } else {
      out = static_cast<T>(k == r ? 1.0f : 0.0f);
    }
    a_aug[i] = out;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
activation_backward_kernel(T* grad_a, const T* __restrict__ z, int64_t n, AdapterActivation act, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    grad_a[i] = static_cast<T>(scale * static_cast<float>(grad_a[i]) * adapter_act_grad(static_cast<float>(z[i]), act));
}

int64_t grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * 16));
}

}  // namespace

void adapter_down_epilogue_cuda(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                                AdapterActivation act, const at::Tensor& coeffs) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t M = z.size(0), r = z.size(1), r_pad = a_aug.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_down_epilogue_cuda", [&] {
    down_epilogue_kernel<scalar_t><<<grid_for(M * r_pad), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, banks.ids_ptr(),
        banks.rows_per_example, banks.num_tasks, a_aug.data_ptr<scalar_t>(), M, r, r_pad, act,
        coeffs.defined() ? coeffs.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adapter_activation_backward_cuda(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_activation_backward_cuda", [&] {
    activation_backward_kernel<scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_a.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), n, act, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
