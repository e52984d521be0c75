// CUDA kernel of the fused linear cross-entropy: one block per row of the [C, V] logits chunk.
// Each thread keeps an online (max, sum of exp) over its strided elements, the block combines them
// (warp shuffles, then shared memory), and a second pass writes the gradient over the logits.
// float32 math whatever the logits dtype; the chunk is read twice, written once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include "linear_cross_entropy/linear_cross_entropy.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ float softcapped(float v, float cap, float inv_cap) {
  return cap > 0.0f ? cap * tanhf(v * inv_cap) : v;
}

template <typename scalar_t>
__global__ void cross_entropy_rows_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                                          float* __restrict__ loss, int64_t V, float cap, float inv_cap,
                                          int64_t ignore_index, float scale) {
  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * V;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) x[j] = scalar_t(0);
    if (threadIdx.x == 0) loss[row] = 0.0f;
    return;
  }
  CUDA_KERNEL_ASSERT(label >= 0 && label < V && "fastpeft linear_cross_entropy: label out of range");
  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float z = softcapped(static_cast<float>(x[j]), cap, inv_cap);
    acc = combine(acc, MaxSum{z, 1.0f});
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_down_sync(0xffffffff, acc.m, offset), __shfl_down_sync(0xffffffff, acc.s, offset)};
    acc = combine(acc, other);
  }
  __shared__ MaxSum warps[kThreads / 32];
  __shared__ float lse_shared;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warps[0];
    for (int w = 1; w < kThreads / 32; ++w) total = combine(total, warps[w]);
    lse_shared = total.m + logf(total.s);
    loss[row] = lse_shared - softcapped(static_cast<float>(x[label]), cap, inv_cap);
  }
  __syncthreads();
  const float lse = lse_shared;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = static_cast<float>(x[j]);
    const float t = cap > 0.0f ? tanhf(v * inv_cap) : 0.0f;
    const float z = cap > 0.0f ? cap * t : v;
    float g = __expf(z - lse) - (j == label ? 1.0f : 0.0f);
    if (cap > 0.0f) g *= 1.0f - t * t;
    x[j] = static_cast<scalar_t>(g * scale);
  }
}

}  // namespace

void cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, const CrossEntropyRows& p) {
  const int64_t C = logits.size(0), V = logits.size(1);
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const float cap = static_cast<float>(p.softcap), inv_cap = cap > 0 ? 1.0f / cap : 0.0f;
  TORCH_CHECK(C <= int64_t(2147483647), "fastpeft linear_cross_entropy: too many rows in one chunk: ", C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows_cuda", [&] {
    cross_entropy_rows_kernel<scalar_t><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), loss.data_ptr<float>(), V, cap, inv_cap,
        p.ignore_index, static_cast<float>(p.grad_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
