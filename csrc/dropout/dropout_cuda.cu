// CUDA kernel of dropout_apply / dropout_apply_add_: one grid-stride pass, the mask hashed per
// element (no mask tensor is read or written).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dropout/dropout.h"

namespace fastpeft {
namespace {

template <typename T, bool kAccumulate>
__global__ void dropout_apply_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, DropoutMask mask) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float v = static_cast<float>(x[i]) * mask.factor(uint64_t(i));
    if (kAccumulate) v = static_cast<float>(out[i]) + v;
    out[i] = static_cast<T>(v);
  }
}

}  // namespace

void dropout_apply_cuda(const at::Tensor& x, at::Tensor& out, const DropoutMask& mask, bool accumulate) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  constexpr int kThreads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_cuda", [&] {
    if (accumulate) {
      dropout_apply_kernel<scalar_t, true>
          <<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, mask);
    } else {
      dropout_apply_kernel<scalar_t, false>
          <<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, mask);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
