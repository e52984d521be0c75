// CUDA kernels of (IA)^3: row-wise scaling by each example's task vector (one launch for any
// number of tasks) and the per-task gradient reduction (two launches, no atomics).
//
// The scaling is a pure streaming kernel: 128-bit loads and stores of x when rows allow it, the
// [T, d] vectors read through the cache (they are small and every example of a task reuses them).
// The reduction's first stage reads grad (and saved) with 128-bit loads too, when rows allow it.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

#include "common/vector_io.cuh"
#include "ia3/ia3.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t task_of_example(const int64_t* ids, int64_t b, int64_t num_tasks) {
  if (ids == nullptr) return 0;
  const int64_t t = ids[b];
  CUDA_KERNEL_ASSERT(t >= 0 && t < num_tasks && "fastpeft (IA)^3: task_ids out of range");
  return t;
}

// VEC elements per thread; VEC > 1 only when d % VEC == 0 and x, out are 16-byte aligned.
// x and out may be the same tensor (in-place scaling), so neither is __restrict__.
template <typename T, typename V, int VEC>
__global__ void __launch_bounds__(kThreads)
scale_rows_kernel(const T* x, T* out, const V* __restrict__ vectors, const int64_t* __restrict__ ids,
                  int64_t rows_per_example, int64_t num_tasks, int64_t M, int64_t d) {
  const int64_t groups_per_row = d / VEC;
  const int64_t total = M * groups_per_row;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < total; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = g / groups_per_row;
    const int64_t j = (g - m * groups_per_row) * VEC;
    const V* v = vectors + task_of_example(ids, m / rows_per_example, num_tasks) * d + j;
    Pack<T, VEC> in = load_pack<T, VEC>(x + m * d + j);
    Pack<T, VEC> res;
#pragma unroll
    for (int i = 0; i < VEC; ++i) res.v[i] = static_cast<T>(static_cast<float>(in.v[i]) * static_cast<float>(v[i]));
    store_pack<T, VEC>(out + m * d + j, res);
  }
}

// Stage 1: block (64 column lanes x 4 row lanes) sums chunk c's rows for 64 * VEC columns, VEC
// consecutive columns per thread moved as one 16-byte load (VEC > 1 only when d % VEC == 0 and
// grad, saved, scaled_out are 16-byte aligned; the launcher checks).
constexpr int kColLanes = 64;
constexpr int kRowLanes = kThreads / kColLanes;

template <typename T, typename V, bool HasSaved, bool WriteScaled, int VEC>
__global__ void __launch_bounds__(kThreads)
reduce_chunks_kernel(const T* grad, const T* __restrict__ saved, const V* __restrict__ vectors,
                     const int64_t* __restrict__ ids, T* scaled_out, float* __restrict__ partial,
                     int64_t rows_per_example, int64_t chunks_per_example, int64_t rows_per_chunk,
                     int64_t num_tasks, int64_t d) {
  __shared__ float s_acc[kRowLanes][VEC][kColLanes];  // [row lane][element][column lane]: no bank conflicts
  const int64_t c = blockIdx.x;
  const int64_t b = c / chunks_per_example;
  const int64_t q = c - b * chunks_per_example;
  const int64_t row0 = b * rows_per_example + q * rows_per_chunk;
  const int64_t row1 = b * rows_per_example + min(rows_per_example, (q + 1) * rows_per_chunk);
  const int tx = threadIdx.x % kColLanes, ty = threadIdx.x / kColLanes;
  const int64_t j = (int64_t(blockIdx.y) * kColLanes + tx) * VEC;  // first of this thread's columns
  float acc[VEC] = {};
  // Checked even when only reducing: stage 2 would silently drop an example with a bad id.
  const int64_t task = task_of_example(ids, b, num_tasks);
  (void)task;  // unused when only reducing
  if (j < d) {
    float l[VEC] = {};
    if (WriteScaled) {
#pragma unroll
      for (int u = 0; u < VEC; ++u) l[u] = static_cast<float>(vectors[task * d + j + u]);
    }
    for (int64_t m = row0 + ty; m < row1; m += kRowLanes) {
      const Pack<T, VEC> g = load_pack<T, VEC>(grad + m * d + j);
      Pack<T, VEC> s;
      if (HasSaved) s = load_pack<T, VEC>(saved + m * d + j);
      Pack<T, VEC> scaled;
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const float gu = static_cast<float>(g.v[u]);
        acc[u] += HasSaved ? gu * static_cast<float>(s.v[u]) : gu;
        if (WriteScaled) scaled.v[u] = static_cast<T>(gu * l[u]);
      }
      // After the read: scaled_out may alias grad.
      if (WriteScaled) store_pack<T, VEC>(scaled_out + m * d + j, scaled);
    }
  }
#pragma unroll
  for (int u = 0; u < VEC; ++u) s_acc[ty][u][tx] = acc[u];
  __syncthreads();
  if (ty == 0 && j < d) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      float sum = s_acc[0][u][tx];
#pragma unroll
      for (int r = 1; r < kRowLanes; ++r) sum += s_acc[r][u][tx];
      partial[c * d + j + u] = sum;
    }
  }
}

// Stage 2: block (32 column lanes x 8 item lanes) for task blockIdx.x and 32 columns.
constexpr int kCols2 = 32;
constexpr int kItems2 = kThreads / kCols2;

template <typename V>
__global__ void __launch_bounds__(kThreads)
reduce_tasks_kernel(const float* __restrict__ partial, const int64_t* __restrict__ perm,
                    const int64_t* __restrict__ offsets, const V* __restrict__ vectors, float* __restrict__ result,
                    int64_t chunks_per_example, int64_t num_examples, int64_t d, bool divide) {
  __shared__ float s_acc[kItems2][kCols2];
  const int64_t t = blockIdx.x;
  const int tx = threadIdx.x % kCols2, ty = threadIdx.x / kCols2;
  const int64_t j = int64_t(blockIdx.y) * kCols2 + tx;
  const int64_t first = perm ? offsets[t] : 0;
  const int64_t count = perm ? offsets[t + 1] - first : num_examples;
  const int64_t items = count * chunks_per_example;
  float acc = 0.0f;
  if (j < d) {
    for (int64_t i = ty; i < items; i += kItems2) {
      const int64_t k = first + i / chunks_per_example;
      const int64_t b = perm ? perm[k] : k;
      acc += partial[(b * chunks_per_example + i % chunks_per_example) * d + j];
    }
  }
  s_acc[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < d) {
    float sum = s_acc[0][tx];
#pragma unroll
    for (int r = 1; r < kItems2; ++r) sum += s_acc[r][tx];
    if (divide) {
      const float l = static_cast<float>(vectors[t * d + j]);
      sum = l == 0.0f ? 0.0f : sum / l;
    }
    result[t * d + j] = sum;
  }
}

int64_t grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * 16));
}

template <typename Fn>
void dispatch_vectors(const at::Tensor& x, const at::Tensor& vectors, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ia3_cuda", [&] {
    using T = scalar_t;
    if (!vectors.defined() || vectors.scalar_type() == at::kFloat) {
      fn(T{}, float{});
    } else {
      fn(T{}, T{});
    }
  });
}

}  // namespace

void ia3_scale_cuda(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0), d = x.size(1);
  dispatch_vectors(x, vectors, [&](auto t, auto v) {
    using T = decltype(t);
    using V = decltype(v);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const bool vec = d % kVec == 0 && is_aligned16(xp) && is_aligned16(op);
    if (vec) {
      scale_rows_kernel<T, V, kVec><<<grid_for(M * d / kVec), kThreads, 0, stream>>>(
          xp, op, vectors.data_ptr<V>(), tasks.ids_ptr(), tasks.rows_per_example, tasks.num_tasks, M, d);
    } else {
      scale_rows_kernel<T, V, 1><<<grid_for(M * d), kThreads, 0, stream>>>(
          xp, op, vectors.data_ptr<V>(), tasks.ids_ptr(), tasks.rows_per_example, tasks.num_tasks, M, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ia3_task_reduce_cuda(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                          const TaskMap& tasks, bool divide, at::Tensor* scaled_out, const TaskReducePlan& plan) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t d = grad.size(1);
  const int64_t chunks = tasks.num_examples * plan.chunks_per_example;
  dispatch_vectors(grad, vectors, [&](auto t, auto v) {
    using T = decltype(t);
    using V = decltype(v);
    const V* vp = vectors.defined() ? vectors.data_ptr<V>() : nullptr;
    const T* sp = saved.defined() ? saved.data_ptr<T>() : nullptr;
    T* outp = scaled_out ? scaled_out->data_ptr<T>() : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = d % kVec == 0 && is_aligned16(grad.data_ptr()) && is_aligned16(sp) && is_aligned16(outp);
    auto stage1 = [&](auto has_saved, auto write_scaled) {
      const auto launch = [&](auto width) {
        constexpr int W = decltype(width)::value;
        const dim3 grid1(static_cast<unsigned>(chunks), static_cast<unsigned>((d + kColLanes * W - 1) / (kColLanes * W)));
        reduce_chunks_kernel<T, V, decltype(has_saved)::value, decltype(write_scaled)::value, W>
            <<<grid1, kThreads, 0, stream>>>(grad.data_ptr<T>(), sp, vp, tasks.ids_ptr(), outp,
                                             plan.partial.data_ptr<float>(), tasks.rows_per_example,
                                             plan.chunks_per_example, plan.rows_per_chunk, tasks.num_tasks, d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        launch(std::integral_constant<int, kVec>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    };
    if (sp && outp) stage1(std::true_type{}, std::true_type{});
    else if (sp) stage1(std::true_type{}, std::false_type{});
    else if (outp) stage1(std::false_type{}, std::true_type{});
    else stage1(std::false_type{}, std::false_type{});

    const dim3 grid2(static_cast<unsigned>(tasks.num_tasks), static_cast<unsigned>((d + kCols2 - 1) / kCols2));
    reduce_tasks_kernel<V><<<grid2, kThreads, 0, stream>>>(
        plan.partial.data_ptr<float>(), plan.perm.defined() ? plan.perm.data_ptr<int64_t>() : nullptr,
        plan.offsets.defined() ? plan.offsets.data_ptr<int64_t>() : nullptr, vp, plan.result.data_ptr<float>(),
        plan.chunks_per_example, tasks.num_examples, d, divide);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastpeft
