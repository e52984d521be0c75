// CUDA kernels of the sparse-delta building blocks.
//
// rows_dot_accum: one warp per delta entry j computes dot(grad_t[o_j], x_t[i_j]) over a token
// chunk with 16-byte loads (rows are padded to a multiple of 8 elements by the op body) and a
// shuffle reduction. Sorted indices put consecutive warps on the same grad_t row, which then
// comes from L1/L2; the x_t rows are the streamed operand.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "sparse_delta/sparse_delta.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t work_items, int64_t items_per_block) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work_items + items_per_block - 1) / items_per_block, int64_t(sms) * 32));
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
add_values_kernel(T* __restrict__ out, int64_t numel, const Index* __restrict__ idx, const float* __restrict__ values,
                  int64_t k) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(idx[j]);
    if (e < 0 || e >= numel) continue;
    out[e] = static_cast<T>(static_cast<float>(out[e]) + values[j]);
  }
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
rows_dot_accum_kernel(float* __restrict__ acc, const T* __restrict__ grad_t, const T* __restrict__ x_t,
                      int64_t out_features, int64_t in_features, int64_t len, const Index* __restrict__ idx,
                      int64_t k) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t numel = out_features * in_features;
  for (int64_t j = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; j < k; j += warps) {
    const int64_t e = static_cast<int64_t>(idx[j]);
    if (e < 0 || e >= numel) continue;  // the same j for the whole warp: no divergence
    const T* a = grad_t + (e / in_features) * len;
    const T* b = x_t + (e % in_features) * len;
    float sum = 0.0f;
    for (int64_t m = int64_t(lane) * kVec; m < len; m += 32 * kVec) {
      alignas(16) T va[kVec];
      alignas(16) T vb[kVec];
      *reinterpret_cast<uint4*>(va) = *reinterpret_cast<const uint4*>(a + m);
      *reinterpret_cast<uint4*>(vb) = *reinterpret_cast<const uint4*>(b + m);
#pragma unroll
      for (int u = 0; u < kVec; ++u) sum += static_cast<float>(va[u]) * static_cast<float>(vb[u]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) acc[j] += sum;
  }
}

}  // namespace

void sparse_delta_add_cuda(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t k = indices.numel();
  const int64_t blocks = grid_for(k, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sparse_delta_add_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_add_cuda_index", [&] {
      add_values_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), out.numel(), indices.data_ptr<index_t>(), values.data_ptr<float>(), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void sparse_delta_rows_dot_accum_cuda(at::Tensor& acc, const at::Tensor& grad_t, const at::Tensor& x_t,
                                      const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t k = indices.numel();
  const int64_t len = x_t.size(1);
  TORCH_INTERNAL_ASSERT(len % 8 == 0 && grad_t.size(1) == len, "rows must be padded to a multiple of 8");
  const int64_t blocks = grid_for(k, kThreads / 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sparse_delta_rows_dot_cuda", [&] {
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(x_t.data_ptr()) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(grad_t.data_ptr()) % 16 == 0);
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_rows_dot_cuda_index", [&] {
      rows_dot_accum_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          acc.data_ptr<float>(), grad_t.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), grad_t.size(0),
          x_t.size(0), len, indices.data_ptr<index_t>(), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastpeft
