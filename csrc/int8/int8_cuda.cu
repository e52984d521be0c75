// CUDA dequantization of bitsandbytes int8 row-wise weights: out[o, k] = round((CB[o, k] * SCB[o]) / 127)
// in float32 (explicit IEEE multiply and divide, no FMA or reciprocal), then one rounding to out's
// dtype; bit-exact with the CPU kernel and with (CB.float() * SCB[:, None] / 127).to(dtype).
//
// Grid-stride loop, each thread writing 4 consecutive outputs; the kernel is bound by the 1 byte
// read and 2-4 bytes written per output (not vectorised further: one pass per layer call).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "int8/int8.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;

template <typename T>
__global__ void dequantize_int8_rowwise_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale,
                                               T* __restrict__ out, int64_t numel, int64_t cols) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * kPerThread;
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kPerThread; base < numel; base += stride) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = base + j;
      if (i < numel) {
        const float prod = __fmul_rn(static_cast<float>(q[i]), scale[i / cols]);
        out[i] = static_cast<T>(__fdiv_rn(prod, 127.0f));
      }
    }
  }
}

}  // namespace

void dequantize_int8_rowwise_cuda_kernel(const Int8RowwiseWeight& w, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t numel = out.numel();
  const int64_t cols = w.data.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t groups = (numel + kPerThread - 1) / kPerThread;
  const int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, int64_t(sms) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_int8_rowwise_cuda", [&] {
    dequantize_int8_rowwise_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        w.data.data_ptr<int8_t>(), w.scale.data_ptr<float>(), out.data_ptr<scalar_t>(), numel, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
