// CUDA kernels of multi-LoRA: segment GEMMs over rows grouped by adapter (punica's SGMV idea).
//
// Row-tiled kernels (shrink, expand, grad_shrink, grad_x): a block owns one tile of up to 64 rows
// that all use the same adapter (a slice of that adapter's segment in the plan) and a 64-wide
// column tile. Its 64 x 64 output is C[i][j] = sum_k row_operand(row_i, k) * adapter_operand(k, j),
// staged 16 deep in shared memory, 4 x 4 outputs per thread, fp32 accumulation; the adapter's
// matrix is read once per tile instead of once per row (what a per-row gather, BGMV, would do).
// A batch with one row per adapter degenerates to that gather, with the same memory traffic.
//
// Segment-reduce kernels (grad_A, grad_B): a block owns a 64 x 64 tile of one adapter's weight
// gradient and sums over that adapter's rows (optionally one of several splits of them, summed
// afterwards in fp32: deterministic, no atomics).
//
// Adapters are read through a table of pointers (one entry per adapter), uploaded per call from
// pinned memory: adapters of different ranks are separate tensors and nothing is stacked or copied.
// Grids are sized from host-known bounds (rows, adapters, max rank); blocks whose tile turns out to
// be empty exit, so nothing about the indices is read back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "multi_lora/multi_lora.h"
#include "multi_lora/multi_lora_table.cuh"

namespace fastpeft {
namespace {

constexpr int kTile = 64;      // output tile is kTile x kTile
constexpr int kDepth = 16;     // reduction elements staged per step
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
static_assert(kTile == kMultiLoraRowsPerTile, "row tiles must match the plan's tile height");

#define FASTPEFT_DISPATCH_COMPUTE_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

__device__ __forceinline__ void multiply_tiles(const float (*a_tile)[kTile + 4], const float (*b_tile)[kTile + 4],
                                               float (&acc)[4][4], int tx, int ty) {
#pragma unroll 4
  for (int kk = 0; kk < kDepth; ++kk) {
    float a[4], b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) a[u] = a_tile[kk][ty * 4 + u];
#pragma unroll
    for (int v = 0; v < 4; ++v) b[v] = b_tile[kk][tx * 4 + v];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
  }
}

// ---- row-tiled kernel ---------------------------------------------------------------------------
// Op supplies: cols(e), depth(e); row(e, row, k): the row operand, contiguous along k; adapter(e, k,
// j): the adapter operand, contiguous along j when Op::kAdapterAlongCols (else along k); store(e,
// row, j, value). Grid: x = row tiles (upper bound), y = column tiles, z = splits of the depth.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
row_tiled_kernel(Op op, const AdapterEntry* __restrict__ table, DevicePlan plan, int64_t depth_per_split) {
  __shared__ float a_tile[kDepth][kTile + 4];
  __shared__ float b_tile[kDepth][kTile + 4];
  __shared__ int32_t rows[kTile];
  const int32_t tile = static_cast<int32_t>(blockIdx.x);
  // Block-uniform exits only (before any __syncthreads).
  if (tile >= plan.tile_start[plan.num_adapters]) return;
  const int a = segment_of(plan.tile_start, plan.num_adapters, tile);  // the adapter owning this tile
  const AdapterEntry e = table[a];
  const int64_t cols = op.cols(e);
  const int64_t j0 = int64_t(blockIdx.y) * kTile;
  if (j0 >= cols) return;
  const int64_t depth = op.depth(e);
  const int64_t k_begin = int64_t(blockIdx.z) * depth_per_split;
  const int64_t k_end = k_begin + depth_per_split < depth ? k_begin + depth_per_split : depth;

  const int64_t seg_end = plan.segment_start[a + 1];
  const int64_t p0 = plan.segment_start[a] + int64_t(tile - plan.tile_start[a]) * kTile;
  if (threadIdx.x < kTile) {
    const int64_t p = p0 + threadIdx.x;
    rows[threadIdx.x] = p < seg_end ? plan.sorted_rows[p] : -1;
  }
  __syncthreads();

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDepth) {
#pragma unroll
    for (int t = 0; t < kTile * kDepth / kThreads; ++t) {
      const int lin = threadIdx.x + t * kThreads;
      {  // row operand: consecutive threads walk k within a row (coalesced)
        const int kk = lin % kDepth, ii = lin / kDepth;
        const int32_t row = rows[ii];
        const int64_t k = k0 + kk;
        a_tile[kk][ii] = (row >= 0 && k < k_end) ? op.row(e, row, k) : 0.0f;
      }
      {  // adapter operand
        const int kk = Op::kAdapterAlongCols ? lin / kTile : lin % kDepth;
        const int jj = Op::kAdapterAlongCols ? lin % kTile : lin / kDepth;
        const int64_t k = k0 + kk, j = j0 + jj;
        b_tile[kk][jj] = (k < k_end && j < cols) ? op.adapter(e, k, j) : 0.0f;
      }
    }
    __syncthreads();
    multiply_tiles(a_tile, b_tile, acc, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int32_t row = rows[ty * 4 + u];
    if (row < 0) continue;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = j0 + tx * 4 + v;
      if (j < cols) op.store(e, row, j, acc[u][v]);
    }
  }
}

// shrink[row][j] = sum_k dropout(x)[row][k] * A[j][k], j < rank (fp32 partials per split).
template <typename T, bool kDropout>
struct ShrinkOp {
  static constexpr bool kAdapterAlongCols = false;
  const T* x;
  T* out;
  float* partial;  // [splits, M, r_max] or null
  int64_t K, M, r_max;
  __device__ int64_t cols(const AdapterEntry& e) const { return e.rank; }
  __device__ int64_t depth(const AdapterEntry&) const { return K; }
  __device__ float row(const AdapterEntry& e, int64_t m, int64_t k) const {
    const int64_t idx = m * K + k;
    const float v = static_cast<float>(x[idx]);
    return kDropout ? v * e.dropout.factor(uint64_t(idx)) : v;
  }
  __device__ float adapter(const AdapterEntry& e, int64_t k, int64_t j) const {
    return static_cast<float>(static_cast<const T*>(e.A)[j * K + k]);
  }
  __device__ void store(const AdapterEntry&, int64_t m, int64_t j, float v) const {
    if (partial != nullptr) {
      partial[(int64_t(blockIdx.z) * M + m) * r_max + j] = v;
    } else {
      out[m * r_max + j] = static_cast<T>(v);
    }
  }
};

// out[row][o] += scaling * sum_j shrink[row][j] * B[o][j].
template <typename T>
struct ExpandOp {
  static constexpr bool kAdapterAlongCols = false;
  const T* shrink;
  T* out;
  int64_t r_max, O;
  __device__ int64_t cols(const AdapterEntry&) const { return O; }
  __device__ int64_t depth(const AdapterEntry& e) const { return e.rank; }
  __device__ float row(const AdapterEntry&, int64_t m, int64_t k) const {
    return static_cast<float>(shrink[m * r_max + k]);
  }
  __device__ float adapter(const AdapterEntry& e, int64_t k, int64_t o) const {
    return static_cast<float>(static_cast<const T*>(e.B)[o * e.rank + k]);
  }
  __device__ void store(const AdapterEntry& e, int64_t m, int64_t o, float v) const {
    T* p = out + m * O + o;
    *p = static_cast<T>(static_cast<float>(*p) + e.scaling * v);
  }
};

// grad_shrink[row][j] = scaling * sum_o g[row][o] * B[o][j], j < rank (fp32 partials per split).
template <typename T>
struct GradShrinkOp {
  static constexpr bool kAdapterAlongCols = true;
  const T* g;
  T* out;
  float* partial;
  int64_t O, M, r_max;
  __device__ int64_t cols(const AdapterEntry& e) const { return e.rank; }
  __device__ int64_t depth(const AdapterEntry&) const { return O; }
  __device__ float row(const AdapterEntry&, int64_t m, int64_t o) const { return static_cast<float>(g[m * O + o]); }
  __device__ float adapter(const AdapterEntry& e, int64_t o, int64_t j) const {
    return static_cast<float>(static_cast<const T*>(e.B)[o * e.rank + j]);
  }
  __device__ void store(const AdapterEntry& e, int64_t m, int64_t j, float v) const {
    v *= e.scaling;
    if (partial != nullptr) {
      partial[(int64_t(blockIdx.z) * M + m) * r_max + j] = v;
    } else {
      out[m * r_max + j] = static_cast<T>(v);
    }
  }
};

// grad_x[row][k] += dropout factor(row, k) * sum_j grad_shrink[row][j] * A[j][k].
template <typename T, bool kDropout>
struct GradXOp {
  static constexpr bool kAdapterAlongCols = true;
  const T* grad_shrink;
  T* grad_x;
  int64_t r_max, K;
  __device__ int64_t cols(const AdapterEntry&) const { return K; }
  __device__ int64_t depth(const AdapterEntry& e) const { return e.rank; }
  __device__ float row(const AdapterEntry&, int64_t m, int64_t j) const {
    return static_cast<float>(grad_shrink[m * r_max + j]);
  }
  __device__ float adapter(const AdapterEntry& e, int64_t j, int64_t k) const {
    return static_cast<float>(static_cast<const T*>(e.A)[j * K + k]);
  }
  __device__ void store(const AdapterEntry& e, int64_t m, int64_t k, float v) const {
    const int64_t idx = m * K + k;
    if (kDropout) v *= e.dropout.factor(uint64_t(idx));
    grad_x[idx] = static_cast<T>(static_cast<float>(grad_x[idx]) + v);
  }
};

// ---- segment-reduce kernel ----------------------------------------------------------------------
// Op supplies: wanted(e), out_rows(e), out_cols(e); lhs(e, row, i) and rhs(e, row, j): both
// contiguous along i / j; store(e, i, j, value, split). Grid: x = column tiles, y = row tiles of
// the per-adapter output, z = adapter * splits + split.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
segment_reduce_kernel(Op op, const AdapterEntry* __restrict__ table, DevicePlan plan, int splits) {
  __shared__ float a_tile[kDepth][kTile + 4];
  __shared__ float b_tile[kDepth][kTile + 4];
  __shared__ int32_t rows[kDepth];
  const int a = static_cast<int>(blockIdx.z) / splits, split = static_cast<int>(blockIdx.z) % splits;
  const AdapterEntry e = table[a];
  if (!op.wanted(e)) return;
  const int64_t I = op.out_rows(e), J = op.out_cols(e);
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  if (i0 >= I || j0 >= J) return;
  const int64_t seg_begin = plan.segment_start[a], seg_end = plan.segment_start[a + 1];
  const int64_t per_split = (seg_end - seg_begin + splits - 1) / splits;
  const int64_t p_begin = seg_begin + split * per_split;
  const int64_t p_end = p_begin + per_split < seg_end ? p_begin + per_split : seg_end;

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};  // an empty range (adapter unused, or an idle split) stores zeros
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kDepth) {
    if (threadIdx.x < kDepth) {
      const int64_t p = p0 + threadIdx.x;
      rows[threadIdx.x] = p < p_end ? plan.sorted_rows[p] : -1;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile * kDepth / kThreads; ++t) {
      const int lin = threadIdx.x + t * kThreads;
      const int kk = lin / kTile, ii = lin % kTile;
      const int32_t row = rows[kk];
      a_tile[kk][ii] = (row >= 0 && i0 + ii < I) ? op.lhs(e, row, i0 + ii) : 0.0f;
      b_tile[kk][ii] = (row >= 0 && j0 + ii < J) ? op.rhs(e, row, j0 + ii) : 0.0f;
    }
    __syncthreads();
    multiply_tiles(a_tile, b_tile, acc, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty * 4 + u, j = j0 + tx * 4 + v;
      if (i < I && j < J) op.store(e, i, j, acc[u][v], split);
    }
}

// grad_A[i][k] = sum_rows grad_shrink[row][i] * dropout(x)[row][k]; i < rank, k < K.
template <typename T, bool kDropout>
struct GradAOp {
  const T* grad_shrink;
  const T* x;
  float* partial;  // [splits, total_rank * K] or null
  int64_t r_max, K, partial_stride;
  __device__ bool wanted(const AdapterEntry& e) const { return e.grad_A != nullptr; }
  __device__ int64_t out_rows(const AdapterEntry& e) const { return e.rank; }
  __device__ int64_t out_cols(const AdapterEntry&) const { return K; }
  __device__ float lhs(const AdapterEntry&, int64_t m, int64_t i) const {
    return static_cast<float>(grad_shrink[m * r_max + i]);
  }
  __device__ float rhs(const AdapterEntry& e, int64_t m, int64_t k) const {
    const int64_t idx = m * K + k;
    const float v = static_cast<float>(x[idx]);
    return kDropout ? v * e.dropout.factor(uint64_t(idx)) : v;
  }
  __device__ void store(const AdapterEntry& e, int64_t i, int64_t k, float v, int split) const {
    if (partial != nullptr) {
      partial[split * partial_stride + e.rank_offset * K + i * K + k] = v;
    } else {
      static_cast<T*>(e.grad_A)[i * K + k] = static_cast<T>(v);
    }
  }
};

// grad_B[o][j] = scaling * sum_rows g[row][o] * shrink[row][j]; o < O, j < rank.
template <typename T>
struct GradBOp {
  const T* g;
  const T* shrink;
  float* partial;  // [splits, total_rank * O] or null
  int64_t O, r_max, partial_stride;
  __device__ bool wanted(const AdapterEntry& e) const { return e.grad_B != nullptr; }
  __device__ int64_t out_rows(const AdapterEntry&) const { return O; }
  __device__ int64_t out_cols(const AdapterEntry& e) const { return e.rank; }
  __device__ float lhs(const AdapterEntry&, int64_t m, int64_t o) const { return static_cast<float>(g[m * O + o]); }
  __device__ float rhs(const AdapterEntry&, int64_t m, int64_t j) const {
    return static_cast<float>(shrink[m * r_max + j]);
  }
  __device__ void store(const AdapterEntry& e, int64_t o, int64_t j, float v, int split) const {
    v *= e.scaling;
    if (partial != nullptr) {
      partial[split * partial_stride + e.rank_offset * O + o * e.rank + j] = v;
    } else {
      static_cast<T*>(e.grad_B)[o * e.rank + j] = static_cast<T>(v);
    }
  }
};

// Sums the fp32 split partials of each adapter's weight gradient into its output tensor.
// Grid: x strides over the adapter's rank * other_dim elements, y = adapter.
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, int64_t partial_stride, int splits,
                                  const AdapterEntry* __restrict__ table, int64_t other_dim, bool into_grad_A) {
  const AdapterEntry e = table[blockIdx.y];
  T* dst = static_cast<T*>(into_grad_A ? e.grad_A : e.grad_B);
  if (dst == nullptr) return;
  const int64_t count = int64_t(e.rank) * other_dim, base = e.rank_offset * other_dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[s * partial_stride + base + i];
    dst[i] = static_cast<T>(sum);
  }
}

// ---- launchers ----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many parts to cut a reduction of `depth` into when `blocks` alone leave SMs idle; each part
// keeps at least 256 of the depth so the fp32 partials stay small next to the work.
int64_t choose_splits(int64_t blocks, int64_t depth) {
  const int64_t target = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (blocks >= target) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({ceil_div(target, blocks), depth / 256, 32}));
}

template <typename Op>
void launch_row_tiled(const Op& op, const at::Tensor& table, const RowPlan& plan, int64_t cols_max, int64_t splits,
                      int64_t depth_per_split) {
  // No rows or no columns (in_features or out_features 0): nothing to write, and a zero grid
  // dimension would be a launch error. The outputs that need zeros were allocated as zeros.
  if (plan.max_tiles() == 0 || cols_max == 0) return;
  const dim3 grid(static_cast<unsigned>(plan.max_tiles()), static_cast<unsigned>(ceil_div(cols_max, kTile)),
                  static_cast<unsigned>(splits));
  TORCH_CHECK(ceil_div(cols_max, kTile) <= 65535, "fastpeft.multi_lora_linear: ", cols_max,
              " columns are more than the CUDA kernels' grid allows (65535 * 64)");
  row_tiled_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(op, table_ptr(table), device_plan(plan),
                                                                            depth_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A [M, r_max] output of a depth-long reduction (shrink, grad_shrink), split when the grid is small.
struct SplitOutput {
  at::Tensor out, partial;
  int64_t splits, per_split;
};

SplitOutput split_output(const at::Tensor& like, const RowPlan& plan, int64_t r_max, int64_t depth) {
  SplitOutput s;
  const int64_t wanted = choose_splits(plan.max_tiles() * ceil_div(r_max, kTile), depth);
  // An empty reduction (depth 0) keeps one split of kDepth: never a division by zero, and its
  // output stays the zeros allocated below.
  s.per_split = std::max<int64_t>(kDepth, ceil_div(ceil_div(depth, wanted), kDepth) * kDepth);
  s.splits = std::max<int64_t>(1, ceil_div(depth, s.per_split));
  // Zeros: columns past an adapter's rank and rows with no adapter are never written.
  s.out = at::zeros({plan.rows, r_max}, like.options());
  if (s.splits > 1) s.partial = at::zeros({s.splits, plan.rows, r_max}, like.options().dtype(at::kFloat));
  return s;
}

at::Tensor finish(SplitOutput& s) {
  if (s.partial.defined()) s.out.copy_(s.partial.sum(0));
  return s.out;
}

template <typename Fn>
void with_dropout_flag(bool dropout, const Fn& fn) {
  if (dropout) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

at::Tensor shrink_cuda(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto& table = table_of(bank, x.device());
  auto s = split_output(x, plan, bank.max_rank, bank.in_features);
  FASTPEFT_DISPATCH_COMPUTE_TYPES(x.scalar_type(), "multi_lora_shrink_cuda", [&] {
    with_dropout_flag(bank.any_dropout, [&](auto flag) {
      ShrinkOp<scalar_t, decltype(flag)::value> op{x.data_ptr<scalar_t>(), s.out.data_ptr<scalar_t>(),
                                                   s.partial.defined() ? s.partial.data_ptr<float>() : nullptr,
                                                   bank.in_features, plan.rows, bank.max_rank};
      launch_row_tiled(op, table, plan, bank.max_rank, s.splits, s.per_split);
    });
  });
  return finish(s);
}

void expand_cuda(at::Tensor& out, const at::Tensor& shrink, const AdapterBank& bank, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(out.device());
  const auto& table = table_of(bank, out.device());
  FASTPEFT_DISPATCH_COMPUTE_TYPES(out.scalar_type(), "multi_lora_expand_cuda", [&] {
    ExpandOp<scalar_t> op{shrink.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), bank.max_rank, bank.out_features};
    launch_row_tiled(op, table, plan, bank.out_features, 1, bank.max_rank);
  });
}

at::Tensor grad_shrink_cuda(const at::Tensor& grad_out, const AdapterBank& bank, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto& table = table_of(bank, grad_out.device());
  auto s = split_output(grad_out, plan, bank.max_rank, bank.out_features);
  FASTPEFT_DISPATCH_COMPUTE_TYPES(grad_out.scalar_type(), "multi_lora_grad_shrink_cuda", [&] {
    GradShrinkOp<scalar_t> op{grad_out.data_ptr<scalar_t>(), s.out.data_ptr<scalar_t>(),
                              s.partial.defined() ? s.partial.data_ptr<float>() : nullptr, bank.out_features,
                              plan.rows, bank.max_rank};
    launch_row_tiled(op, table, plan, bank.max_rank, s.splits, s.per_split);
  });
  return finish(s);
}

void grad_x_accum_cuda(at::Tensor& grad_x, const at::Tensor& grad_shrink, const AdapterBank& bank,
                       const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const auto& table = table_of(bank, grad_x.device());
  FASTPEFT_DISPATCH_COMPUTE_TYPES(grad_x.scalar_type(), "multi_lora_grad_x_cuda", [&] {
    with_dropout_flag(bank.any_dropout, [&](auto flag) {
      GradXOp<scalar_t, decltype(flag)::value> op{grad_shrink.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                                  bank.max_rank, bank.in_features};
      launch_row_tiled(op, table, plan, bank.in_features, 1, bank.max_rank);
    });
  });
}

// One weight gradient family (all grad_A or all grad_B): out_rows_max x out_cols_max tiles per
// adapter, `other_dim` = K (grad_A) or O (grad_B).
template <typename MakeOp>
void launch_weight_grads(const at::Tensor& table, const AdapterBank& bank, const RowPlan& plan, int64_t out_rows_max,
                         int64_t out_cols_max, int64_t other_dim, bool into_grad_A, at::ScalarType dtype,
                         const MakeOp& make_op) {
  const int64_t n = static_cast<int64_t>(bank.size());
  const int64_t col_tiles = ceil_div(out_cols_max, kTile), row_tiles = ceil_div(out_rows_max, kTile);
  if (n == 0 || col_tiles == 0 || row_tiles == 0) return;  // empty gradients: nothing to write
  TORCH_CHECK(row_tiles <= 65535 && n <= 65535, "fastpeft.multi_lora_linear: too many adapters (", n,
              ") or output rows (", out_rows_max, ") for the CUDA weight-gradient grid");
  int64_t splits = choose_splits(n * col_tiles * row_tiles, plan.rows);
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535 / n));
  const int64_t stride = bank.total_rank * other_dim;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits * stride}, table.options().dtype(at::kFloat));
  const auto op = make_op(partial.defined() ? partial.data_ptr<float>() : nullptr, stride);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles), static_cast<unsigned>(n * splits));
  const auto stream = at::cuda::getCurrentCUDAStream();
  segment_reduce_kernel<<<grid, kThreads, 0, stream>>>(op, table_ptr(table), device_plan(plan), static_cast<int>(splits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>(ceil_div(bank.max_rank * other_dim, 256), 4096);
    FASTPEFT_DISPATCH_COMPUTE_TYPES(dtype, "multi_lora_sum_splits_cuda", [&] {
      sum_splits_kernel<scalar_t><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(n)), 256, 0, stream>>>(
          partial.data_ptr<float>(), stride, static_cast<int>(splits), table_ptr(table), other_dim, into_grad_A);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void grad_adapters_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                        const at::Tensor& grad_shrink, const AdapterBank& bank, const RowPlan& plan,
                        std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto table = upload_table(bank, &grad_A, &grad_B, x.device());
  const int64_t K = bank.in_features, O = bank.out_features, R = bank.max_rank;
  FASTPEFT_DISPATCH_COMPUTE_TYPES(x.scalar_type(), "multi_lora_grad_adapters_cuda", [&] {
    with_dropout_flag(bank.any_dropout, [&](auto flag) {
      launch_weight_grads(table, bank, plan, R, K, K, /*into_grad_A=*/true, x.scalar_type(),
                          [&](float* partial, int64_t stride) {
                            return GradAOp<scalar_t, decltype(flag)::value>{
                                grad_shrink.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partial, R, K, stride};
                          });
    });
    launch_weight_grads(table, bank, plan, O, R, O, /*into_grad_A=*/false, x.scalar_type(),
                        [&](float* partial, int64_t stride) {
                          return GradBOp<scalar_t>{grad_out.data_ptr<scalar_t>(), shrink.data_ptr<scalar_t>(),
                                                   partial, O, R, stride};
                        });
  });
}

}  // namespace

const MultiLoraKernels& multi_lora_cuda_kernels() {
  static const MultiLoraKernels kernels{shrink_cuda, expand_cuda, grad_shrink_cuda, grad_x_accum_cuda,
                                        grad_adapters_cuda};
  return kernels;
}

}  // namespace fastpeft
