// CUDA kernel of the sparse-masked AdamW step: one launch updates every tensor of one dtype.
//
// The tensors' descriptors (sparse_optim.h) go to the device as one small buffer per step (the
// gradients' addresses change between steps, so it is rebuilt; a few KiB for a 7B model). Each
// block owns kChunk consecutive trained entries of one tensor and finds that tensor by a binary
// search over the descriptors' first chunks. A thread handles kVec consecutive entries per
// iteration: the moments and the indices come in as 16-byte loads, the parameter and gradient
// entries are gathered (sorted indices keep neighbouring threads on neighbouring lines).
// The update is float32 whatever the parameter dtype, and the parameter is rounded once.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "sparse_optim/sparse_optim.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kIters = 4;
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kIters;

__device__ __forceinline__ void load_indices(const SparseAdamWTensor& t, int64_t j0, int64_t end, bool full,
                                             int64_t (&e)[kVec]) {
  if (t.index_kind == IndexKind::None) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = j0 + i;
  } else if (t.index_kind == IndexKind::Int32) {
    const int32_t* idx = static_cast<const int32_t*>(t.indices);
    if (full) {
      const int4 v = *reinterpret_cast<const int4*>(idx + j0);
      e[0] = v.x; e[1] = v.y; e[2] = v.z; e[3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = (j0 + i < end) ? idx[j0 + i] : -1;
    }
  } else {
    const int64_t* idx = static_cast<const int64_t*>(t.indices);
    if (full) {
      const longlong2 a = *reinterpret_cast<const longlong2*>(idx + j0);
      const longlong2 b = *reinterpret_cast<const longlong2*>(idx + j0 + 2);
      e[0] = a.x; e[1] = a.y; e[2] = b.x; e[3] = b.y;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = (j0 + i < end) ? idx[j0 + i] : -1;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sparse_adamw_kernel(const SparseAdamWTensor* __restrict__ tensors, int n_tensors, AdamWHyper h,
                    const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // AMP found inf/nan: skip the step
  __shared__ int s_tensor;
  __shared__ AdamWScalars s_scalars;
  if (threadIdx.x == 0) {
    int lo = 0, hi = n_tensors - 1;  // the last tensor whose first chunk is <= this block
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tensors[mid].first_chunk <= int64_t(blockIdx.x)) lo = mid; else hi = mid - 1;
    }
    s_tensor = lo;
    // The step's scalars (two FP64 pow) once per block, not once per thread: the step count is a
    // device tensor (no host sync), so they cannot come from the host.
    s_scalars = adamw_scalars(h, static_cast<double>(*tensors[lo].step));
  }
  __syncthreads();
  const SparseAdamWTensor t = tensors[s_tensor];
  const AdamWScalars s = s_scalars;
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const int64_t begin = (int64_t(blockIdx.x) - t.first_chunk) * kChunk;
  const int64_t end = begin + kChunk < t.count ? begin + kChunk : t.count;

#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int64_t j0 = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
    if (j0 >= end) break;
    const bool full = t.vector_aligned && j0 + kVec <= end;
    int64_t e[kVec];
    load_indices(t, j0, end, full, e);
    float m[kVec], v[kVec], p[kVec], g[kVec];
    bool ok[kVec];
    if (full) {
      const float4 mv = *reinterpret_cast<const float4*>(t.exp_avg + j0);
      const float4 vv = *reinterpret_cast<const float4*>(t.exp_avg_sq + j0);
      m[0] = mv.x; m[1] = mv.y; m[2] = mv.z; m[3] = mv.w;
      v[0] = vv.x; v[1] = vv.y; v[2] = vv.z; v[3] = vv.w;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        m[i] = (j0 + i < end) ? t.exp_avg[j0 + i] : 0.0f;
        v[i] = (j0 + i < end) ? t.exp_avg_sq[j0 + i] : 0.0f;
      }
    }
    // Issue every gather before any arithmetic so the loads overlap.
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      ok[i] = j0 + i < end && e[i] >= 0 && e[i] < t.numel;  // never write outside the parameter
      p[i] = ok[i] ? static_cast<float>(param[e[i]]) : 0.0f;
      g[i] = ok[i] ? static_cast<float>(grad[e[i]]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (!ok[i]) continue;
      adamw_update(p[i], g[i] / scale, m[i], v[i], s);
      param[e[i]] = static_cast<T>(p[i]);
    }
    if (full) {
      *reinterpret_cast<float4*>(t.exp_avg + j0) = make_float4(m[0], m[1], m[2], m[3]);
      *reinterpret_cast<float4*>(t.exp_avg_sq + j0) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (!ok[i]) continue;
        t.exp_avg[j0 + i] = m[i];
        t.exp_avg_sq[j0 + i] = v[i];
      }
    }
  }
}

}  // namespace

void sparse_adamw_cuda_kernel(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
                              const at::Tensor& grad_scale, const at::Tensor& found_inf, at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  int64_t chunks = 0;
  for (auto& t : tensors) {
    t.first_chunk = chunks;
    chunks += (t.count + kChunk - 1) / kChunk;
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "fastpeft.sparse_adamw_step_: ", chunks,
              " chunks of trained entries exceed one launch; split the parameters into groups");
  TORCH_CHECK(tensors.size() < (size_t(1) << 31), "fastpeft.sparse_adamw_step_: too many tensors");
  const int64_t bytes = int64_t(tensors.size() * sizeof(SparseAdamWTensor));
  // Pinned staging so the copy is asynchronous; the caching host allocator keeps the buffer until
  // the copy on this stream has run.
  auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tensors.data(), bytes);
  auto meta = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  meta.copy_(host, /*non_blocking=*/true);

  const float* scale = grad_scale.defined() ? grad_scale.data_ptr<float>() : nullptr;
  const float* inf = found_inf.defined() ? found_inf.data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_adamw_cuda", [&] {
    sparse_adamw_kernel<scalar_t><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        reinterpret_cast<const SparseAdamWTensor*>(meta.data_ptr()), static_cast<int>(tensors.size()), h, scale,
        inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
