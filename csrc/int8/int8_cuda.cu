// CUDA dequantization of bitsandbytes int8 row-wise weights: out[o, k] = round((CB[o, k] * SCB[o]) / 127)
// in float32 (explicit IEEE multiply and divide, no FMA or reciprocal), then one rounding to out's
// dtype; bit-exact with the CPU kernel and with (CB.float() * SCB[:, None] / 127).to(dtype).
//
// Row-wise 2-D: a block walks rows (grid-stride), reads the row's scale once, and each thread
// handles 16 consecutive columns with one 16-byte load of int8 codes and 16-byte stores of the
// outputs, so no per-element 64-bit divide finds the row. Rows whose start is not 16-byte aligned
// in the codes or the output (cols % 16 != 0, an offset `out` view) take the scalar loop.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "int8/int8.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 16;  // int8 codes per 16-byte load

__device__ __forceinline__ float dequant(int8_t code, float row_scale) {
  return __fdiv_rn(__fmul_rn(static_cast<float>(code), row_scale), 127.0f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_int8_rowwise_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                               int64_t rows, int64_t cols, bool vectorized) {
  static_assert((kVec * sizeof(T)) % 16 == 0, "outputs go out in 16-byte stores");
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float row_scale = scale[r];
    const int8_t* q_row = q + r * cols;
    T* out_row = out + r * cols;
    if (vectorized) {  // cols % 16 == 0 and both bases 16-byte aligned (checked on the host)
      for (int64_t c = int64_t(threadIdx.x) * kVec; c < cols; c += int64_t(blockDim.x) * kVec) {
        const int4 packed = *reinterpret_cast<const int4*>(q_row + c);
        const int8_t* codes = reinterpret_cast<const int8_t*>(&packed);
        T values[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) values[j] = static_cast<T>(dequant(codes[j], row_scale));
#pragma unroll
        for (int j = 0; j < int(kVec * sizeof(T) / 16); ++j)
          reinterpret_cast<int4*>(out_row + c)[j] = reinterpret_cast<const int4*>(values)[j];
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out_row[c] = static_cast<T>(dequant(q_row[c], row_scale));
    }
  }
}

}  // namespace

void dequantize_int8_rowwise_cuda_kernel(const Int8RowwiseWeight& w, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = w.data.size(0), cols = w.data.size(1);
  if (rows == 0 || cols == 0) return;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(rows, int64_t(sms) * 32);
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vectorized = cols % kVec == 0 && aligned(w.data.data_ptr()) && aligned(out.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_int8_rowwise_cuda", [&] {
    dequantize_int8_rowwise_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        w.data.data_ptr<int8_t>(), w.scale.data_ptr<float>(), out.data_ptr<scalar_t>(), rows, cols, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
