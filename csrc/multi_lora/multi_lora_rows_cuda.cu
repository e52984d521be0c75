// CUDA row kernels of multi-LoRA: one block per row, 16-byte loads where the rows allow them.
//
//   grouped_gather / grouped_scatter  move rows between x's order and the grouped layout of the
//       grouped-GEMM path (multi_lora_grouped.cpp), fusing the dropout mask, the per-adapter
//       scaling and the accumulation into the destination; memory-bound copies.
//   bgmv_shrink / bgmv_expand  the forward of decode-like batches (a few rows per adapter), where a
//       64-row tile of the segment kernels would be nearly empty: shrink is one warp per (row, rank
//       column), a dot product over K with 16-byte loads of x and of the adapter's row; expand is
//       one thread per (row, output), the adapter's row of B read with 16-byte loads. Every element
//       of A and B a row uses is read once per row, as BGMV (punica) does.
//
// All of them find their row's adapter on the device (a binary search over the plan's starts), so
// nothing about the indices is read back. fp32 accumulation, one rounding per output element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <vector>

#include "common/vector_io.cuh"
#include "multi_lora/multi_lora.h"
#include "multi_lora/multi_lora_table.cuh"

namespace fastpeft {
namespace {

constexpr int kRowThreads = 128;   // gather / scatter: threads per row
constexpr int kWarps = 8;          // bgmv shrink: warps per block, one rank column each
constexpr int kExpandThreads = 256;

#define FASTPEFT_DISPATCH_ROW_TYPES(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Elements per 16-byte access when every extent and pointer allows it, else 1.
template <typename T>
int vector_width(const std::vector<int64_t>& extents, const std::vector<const void*>& pointers) {
  constexpr int kVec = 16 / sizeof(T);
  for (const int64_t e : extents)
    if (e % kVec != 0) return 1;
  for (const void* p : pointers)
    if (!is_aligned16(p)) return 1;
  return kVec;
}

template <typename T, typename Launch>
void with_vector_width(int vec, const Launch& launch) {
  if (vec == 16 / int(sizeof(T))) {
    launch(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// ---- the grouped layout --------------------------------------------------------------------------

struct LayoutRow {
  int32_t row;      // row of x, or -1 for padding / past the last group
  int32_t adapter;  // valid when row >= 0
};

__device__ __forceinline__ LayoutRow layout_row(const DevicePlan& plan, int64_t p) {
  const int n = plan.num_adapters;
  if (p >= plan.group_start[n]) return {-1, -1};
  const int a = segment_of(plan.group_start, n, p);
  const int64_t local = p - plan.group_start[a];
  if (local >= plan.segment_start[a + 1] - plan.segment_start[a]) return {-1, -1};
  return {plan.sorted_rows[plan.segment_start[a] + local], a};
}

// Grid: x = layout rows (P). Writes every element of its output row (zeros where nothing is held).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
grouped_gather_kernel(const T* __restrict__ src, int64_t src_cols, int64_t copy, int64_t cols, T* __restrict__ out,
                      DevicePlan plan, const AdapterEntry* __restrict__ table, bool dropout, bool scaled) {
  const int64_t p = blockIdx.x;
  const LayoutRow lr = layout_row(plan, p);
  T* d = out + p * cols;
  int64_t zero_from = 0;
  if (lr.row >= 0) {
    const AdapterEntry& e = table[lr.adapter];
    const bool mask = dropout && e.dropout.threshold > 0;
    const float scale = scaled ? e.scaling : 1.0f;
    const int64_t base = int64_t(lr.row) * src_cols;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < copy; c += int64_t(kRowThreads) * VEC) {
      Pack<T, VEC> pack = load_pack<T, VEC>(src + base + c);
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        float v = static_cast<float>(pack.v[u]) * scale;
        if (mask) v *= e.dropout.factor(uint64_t(base + c + u));
        pack.v[u] = static_cast<T>(v);
      }
      store_pack<T, VEC>(d + c, pack);
    }
    zero_from = copy;
  }
  for (int64_t c = zero_from + threadIdx.x; c < cols; c += kRowThreads) d[c] = static_cast<T>(0.0f);
}

// Grid: x = layout rows (P); rows that hold nothing exit.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
grouped_scatter_kernel(T* __restrict__ dst, int64_t cols, const T* __restrict__ src, int64_t src_stride,
                       DevicePlan plan, const AdapterEntry* __restrict__ table, bool accumulate, bool dropout,
                       bool scaled) {
  const int64_t p = blockIdx.x;
  const LayoutRow lr = layout_row(plan, p);
  if (lr.row < 0) return;
  const AdapterEntry& e = table[lr.adapter];
  const bool mask = dropout && e.dropout.threshold > 0;
  const float scale = scaled ? e.scaling : 1.0f;
  const int64_t base = int64_t(lr.row) * cols;
  const T* s = src + p * src_stride;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < cols; c += int64_t(kRowThreads) * VEC) {
    const Pack<T, VEC> in = load_pack<T, VEC>(s + c);
    Pack<T, VEC> out;
    if (accumulate) out = load_pack<T, VEC>(dst + base + c);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      float v = static_cast<float>(in.v[u]) * scale;
      if (mask) v *= e.dropout.factor(uint64_t(base + c + u));
      out.v[u] = static_cast<T>(accumulate ? static_cast<float>(out.v[u]) + v : v);
    }
    store_pack<T, VEC>(dst + base + c, out);
  }
}

unsigned grid_rows(int64_t rows) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "fastpeft.multi_lora_linear: ", rows, " rows are more than one CUDA grid");
  return static_cast<unsigned>(rows);
}

at::Tensor grouped_gather_cuda(const at::Tensor& src, int64_t cols, const AdapterBank& bank, const RowPlan& plan,
                               bool dropout, bool scaled) {
  TORCH_CHECK(src.is_contiguous() && src.dim() == 2, "multi_lora grouped gather: src must be a contiguous matrix");
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t P = plan.max_grouped_rows(), src_cols = src.size(1), copy = std::min(cols, src_cols);
  auto out = at::empty({P, cols}, src.options());
  if (P == 0 || cols == 0) return out;
  const auto& table = table_of(bank, src.device());
  FASTPEFT_DISPATCH_ROW_TYPES(src.scalar_type(), "multi_lora_grouped_gather_cuda", [&] {
    const int vec = vector_width<scalar_t>({src_cols, copy, cols}, {src.data_ptr(), out.data_ptr()});
    with_vector_width<scalar_t>(vec, [&](auto v) {
      grouped_gather_kernel<scalar_t, decltype(v)::value>
          <<<grid_rows(P), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              src.data_ptr<scalar_t>(), src_cols, copy, cols, out.data_ptr<scalar_t>(), device_plan(plan),
              table_ptr(table), dropout, scaled);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

void grouped_scatter_cuda(at::Tensor& dst, const at::Tensor& src, const AdapterBank& bank, const RowPlan& plan,
                          bool accumulate, bool dropout, bool scaled) {
  TORCH_CHECK(dst.is_contiguous() && src.dim() == 2 && src.stride(1) == 1 && src.size(1) >= dst.size(1),
              "multi_lora grouped scatter: dst must be contiguous, src [P, >= ", dst.size(1), "] with unit column stride");
  const c10::cuda::CUDAGuard guard(dst.device());
  const int64_t P = std::min<int64_t>(src.size(0), plan.max_grouped_rows()), cols = dst.size(1);
  if (P == 0 || cols == 0) return;
  const auto& table = table_of(bank, dst.device());
  FASTPEFT_DISPATCH_ROW_TYPES(dst.scalar_type(), "multi_lora_grouped_scatter_cuda", [&] {
    const int vec = vector_width<scalar_t>({cols, src.stride(0)}, {src.data_ptr(), dst.data_ptr()});
    with_vector_width<scalar_t>(vec, [&](auto v) {
      grouped_scatter_kernel<scalar_t, decltype(v)::value>
          <<<grid_rows(P), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              dst.data_ptr<scalar_t>(), cols, src.data_ptr<scalar_t>(), src.stride(0), device_plan(plan),
              table_ptr(table), accumulate, dropout, scaled);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---- BGMV (decode) -----------------------------------------------------------------------------

// The adapter of sorted position p, or -1 past the last segment (rows with no adapter).
__device__ __forceinline__ int adapter_at(const DevicePlan& plan, int64_t p) {
  if (p >= plan.segment_start[plan.num_adapters]) return -1;
  return segment_of(plan.segment_start, plan.num_adapters, p);
}

// Grid: x = sorted positions (M), y = groups of kWarps rank columns. Warp w computes
// shrink[row][j] = sum_k dropout(x)[row][k] * A[j][k] for j = y * kWarps + w < rank.
template <typename T, int VEC, bool kDropout>
__global__ void __launch_bounds__(kWarps * 32)
bgmv_shrink_kernel(const T* __restrict__ x, T* __restrict__ shrink, int64_t K, int64_t r_max, DevicePlan plan,
                   const AdapterEntry* __restrict__ table) {
  const int64_t p = blockIdx.x;
  const int a = adapter_at(plan, p);
  if (a < 0) return;
  const AdapterEntry& e = table[a];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.y) * kWarps + warp;
  if (j >= e.rank) return;
  const int64_t row = plan.sorted_rows[p];
  const T* xr = x + row * K;
  const T* ar = static_cast<const T*>(e.A) + j * K;
  float acc = 0.0f;
  for (int64_t k = int64_t(lane) * VEC; k < K; k += 32 * VEC) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k);
    const Pack<T, VEC> av = load_pack<T, VEC>(ar + k);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      float v = static_cast<float>(xv.v[u]);
      if (kDropout) v *= e.dropout.factor(uint64_t(row * K + k + u));
      acc += v * static_cast<float>(av.v[u]);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) shrink[row * r_max + j] = static_cast<T>(acc);
}

// Grid: x = sorted positions (M), y = groups of kExpandThreads outputs. Thread o:
// out[row][o] += scaling * sum_j shrink[row][j] * B[o][j].
template <typename T, int VEC>
__global__ void __launch_bounds__(kExpandThreads)
bgmv_expand_kernel(const T* __restrict__ shrink, T* __restrict__ out, int64_t O, int64_t r_max, DevicePlan plan,
                   const AdapterEntry* __restrict__ table) {
  extern __shared__ float s_row[];  // [r_max]: this row's shrink in fp32
  const int64_t p = blockIdx.x;
  const int a = adapter_at(plan, p);
  if (a < 0) return;  // block-uniform, before the barrier
  const AdapterEntry& e = table[a];
  const int64_t row = plan.sorted_rows[p];
  for (int64_t j = threadIdx.x; j < e.rank; j += kExpandThreads) s_row[j] = static_cast<float>(shrink[row * r_max + j]);
  __syncthreads();
  const int64_t o = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= O) return;
  const T* br = static_cast<const T*>(e.B) + o * e.rank;
  float acc = 0.0f;
  for (int64_t j = 0; j < e.rank; j += VEC) {
    const Pack<T, VEC> bv = load_pack<T, VEC>(br + j);
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc += s_row[j + u] * static_cast<float>(bv.v[u]);
  }
  T* dst = out + row * O + o;
  *dst = static_cast<T>(static_cast<float>(*dst) + e.scaling * acc);
}

}  // namespace

const MultiLoraGroupedKernels& multi_lora_grouped_cuda_kernels() {
  static const MultiLoraGroupedKernels kernels{grouped_gather_cuda, grouped_scatter_cuda};
  return kernels;
}

bool multi_lora_cuda_has_grouped_gemm(const at::Tensor& x) {
  if (!x.is_cuda() || x.scalar_type() != at::kBFloat16) return false;
  const int major = at::cuda::getDeviceProperties(x.get_device())->major;
  return major == 9 || major == 10;
}

at::Tensor multi_lora_bgmv_shrink_cuda(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(x.device());
  // Zeros: columns past a row's rank and rows with no adapter are never written.
  auto shrink = at::zeros({plan.rows, bank.max_rank}, x.options());
  const int64_t K = bank.in_features;
  if (plan.rows == 0 || bank.max_rank == 0 || K == 0) return shrink;
  const auto& table = table_of(bank, x.device());
  const dim3 grid(grid_rows(plan.rows), static_cast<unsigned>((bank.max_rank + kWarps - 1) / kWarps));
  TORCH_CHECK(grid.y <= 65535, "fastpeft.multi_lora_linear: rank ", bank.max_rank, " is too large for BGMV");
  FASTPEFT_DISPATCH_ROW_TYPES(x.scalar_type(), "multi_lora_bgmv_shrink_cuda", [&] {
    std::vector<const void*> pointers{x.data_ptr()};
    for (const auto& A : bank.A) pointers.push_back(A.data_ptr());
    with_vector_width<scalar_t>(vector_width<scalar_t>({K}, pointers), [&](auto v) {
      const auto launch = [&](auto flag) {
        bgmv_shrink_kernel<scalar_t, decltype(v)::value, decltype(flag)::value>
            <<<grid, kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
                x.data_ptr<scalar_t>(), shrink.data_ptr<scalar_t>(), K, bank.max_rank, device_plan(plan),
                table_ptr(table));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (bank.any_dropout) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
  });
  return shrink;
}

void multi_lora_bgmv_expand_cuda_(at::Tensor& out, const at::Tensor& shrink, const AdapterBank& bank,
                                  const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t O = bank.out_features;
  if (plan.rows == 0 || O == 0) return;  // a zero grid dimension would be a launch error
  const auto& table = table_of(bank, out.device());
  const dim3 grid(grid_rows(plan.rows), static_cast<unsigned>((O + kExpandThreads - 1) / kExpandThreads));
  TORCH_CHECK(grid.y <= 65535, "fastpeft.multi_lora_linear: out_features ", O, " is too large for BGMV");
  const size_t smem = static_cast<size_t>(bank.max_rank) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "fastpeft.multi_lora_linear: rank ", bank.max_rank, " is too large for BGMV");
  FASTPEFT_DISPATCH_ROW_TYPES(out.scalar_type(), "multi_lora_bgmv_expand_cuda", [&] {
    // 16-byte loads of B's rows need every adapter's rank to be a multiple of the width.
    std::vector<const void*> pointers;
    for (const auto& B : bank.B) pointers.push_back(B.data_ptr());
    with_vector_width<scalar_t>(vector_width<scalar_t>(bank.ranks, pointers), [&](auto v) {
      bgmv_expand_kernel<scalar_t, decltype(v)::value><<<grid, kExpandThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          shrink.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), O, bank.max_rank, device_plan(plan), table_ptr(table));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastpeft
