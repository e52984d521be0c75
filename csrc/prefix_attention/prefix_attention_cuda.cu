// CUDA kernels of the prefix part of prefix attention.
//
// All three kernels work on 64 x 64 tiles whose rows are the query rows of one (example, kv head)
// group (GQA: the group's query heads stacked, g * Sq rows, all sharing one prefix set) and whose
// columns are 64 prefix keys, or the transpose. Head-dim products are staged through shared
// memory 16 at a time, 256 threads each own 4 x 4 tile entries and 4 rows x D/16 columns of the
// output, and every sum is fp32. Softmax weights exist only as one 64 x 64 tile in shared memory:
// no B x P (or B x Sq x P) tensor, and no batch-repeated prefix, is ever written.
//
//   forward    block (b, kv head, 64 rows): starts from the sequence part's state (m, l, acc) =
//              (L1, 1, O1), folds in the P prefix keys with an online softmax, writes O and L
//              (in place over O1 when the layouts agree).
//   grad q     block (b, kv head, 64 rows): dq += scale * sum_j ds_ij k_j, with p_ij =
//              exp(s_ij - L_i) from the merged L and ds_ij = p_ij (dO_i . v_j - Delta_i).
//   grad bank  block (b, kv head, 64 keys, split of the rows): dk_j += scale * sum_i ds_ij q_i,
//              dv_j += sum_i p_ij dO_i, added with fp32 atomics into the example's set [N, Hkv, P, D]
//              (the per-set sum over examples; a bank of N sets costs no more than one set).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr int kTile = 64;      // rows (or keys) per tile side
constexpr int kDepth = 16;     // head-dim elements, or rows, staged per step
constexpr int kThreads = 256;  // 16 x 16; thread (ty, tx) owns tile rows ty*4+u and columns tx+16v

// Rows (b, h, s) of a [B, H, S, D] tensor with a contiguous last dim.
template <typename T>
struct View {
  T* data;
  int64_t sb, sh, ss;
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

struct TileShared {
  float a[kDepth][kTile + 1];  // staged A^T: a[d][row]
  float b[kDepth][kTile + 1];  // staged B^T
  float w[kTile][kTile + 1];   // softmax weights (or their gradients) of the current tile
  int row_h[kTile];            // query head of each tile row, -1 past the end
  int row_s[kTile];            // its position
  float row_lse[kTile];
  float row_delta[kTile];
};

// Query rows of one (b, kv head) group, read through the tile's row table; 0 outside.
template <typename T>
struct SeqRows {
  const T* base;  // at example b
  int64_t sh, ss;
  const int* row_h;
  const int* row_s;
  int D;
  __device__ __forceinline__ float operator()(int i, int d) const {
    const int h = row_h[i];
    return (h >= 0 && d < D) ? static_cast<float>(base[h * sh + row_s[i] * ss + d]) : 0.0f;
  }
};

// Keys key0 + i of one prefix set [P, D]; 0 outside.
template <typename T>
struct PrefixRows {
  const T* base;
  int key0, P, D;
  __device__ __forceinline__ float operator()(int i, int d) const {
    const int key = key0 + i;
    return (key < P && d < D) ? static_cast<float>(base[int64_t(key) * D + d]) : 0.0f;
  }
};

__device__ __forceinline__ float max16(float x) {  // over the 16 lanes sharing ty
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float sum16(float x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ void setup_rows(TileShared& sm, int64_t row0, int64_t rows, int kv_head, int group,
                                           int64_t Sq) {
  if (threadIdx.x < kTile) {
    const int64_t r = row0 + threadIdx.x;
    const bool valid = r < rows;
    sm.row_h[threadIdx.x] = valid ? kv_head * group + int(r / Sq) : -1;
    sm.row_s[threadIdx.x] = valid ? int(r % Sq) : 0;
  }
}

template <class Load>
__device__ __forceinline__ void stage_transposed(const Load& load, float (*tile)[kTile + 1], int d0) {
#pragma unroll
  for (int t = 0; t < kTile * kDepth / kThreads; ++t) {
    const int lin = threadIdx.x + t * kThreads;
    const int i = lin / kDepth, kk = lin % kDepth;  // consecutive threads read along d: coalesced
    tile[kk][i] = load(i, d0 + kk);
  }
}

// acc[u][v] = sum_d A(ty*4 + u, d) * B(tx + 16v, d)
template <class LoadA, class LoadB>
__device__ void tile_dot(const LoadA& A, const LoadB& B, int D, TileShared& sm, float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = 0.0f;
  for (int d0 = 0; d0 < D; d0 += kDepth) {
    stage_transposed(A, sm.a, d0);
    stage_transposed(B, sm.b, d0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = sm.a[kk][ty * 4 + u];
#pragma unroll
      for (int v = 0; v < 4; ++v) b[v] = sm.b[kk][tx + 16 * v];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
    }
    __syncthreads();
  }
}

// acc[u][c] += sum_{k < count} w[ty*4 + u][k] * R(k, tx + 16c); R is staged kDepth rows at a time.
// Rows past `count` load as 0 and their weights are finite, so they add nothing.
template <int kMaxD, class LoadR>
__device__ void accumulate_rows(const LoadR& R, int count, TileShared& sm, float (*rows)[kMaxD],
                                float acc[4][kMaxD / 16]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int k0 = 0; k0 < count; k0 += kDepth) {
#pragma unroll
    for (int t = 0; t < kDepth * kMaxD / kThreads; ++t) {
      const int lin = threadIdx.x + t * kThreads;
      const int kk = lin / kMaxD, d = lin % kMaxD;
      rows[kk][d] = R(k0 + kk, d);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kDepth; ++kk) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float wv = sm.w[ty * 4 + u][k0 + kk];
#pragma unroll
        for (int c = 0; c < kMaxD / 16; ++c) acc[u][c] = fmaf(wv, rows[kk][tx + 16 * c], acc[u][c]);
      }
    }
    __syncthreads();
  }
}

template <typename T>
struct ForwardParams {
  View<const T> q, seq_out;
  View<const float> seq_lse;
  View<T> out;
  float* lse;  // [B, H, Sq] contiguous
  const T* prefix_k;
  const T* prefix_v;  // [N, Hkv, P, D] contiguous
  const int64_t* index;  // [B], or nullptr for set 0
  int64_t H, Hkv, Sq;
  int P, D, group;
  float scale;
};

template <typename T, int kMaxD>
__global__ void __launch_bounds__(kThreads) prefix_forward_kernel(const ForwardParams<T> p) {
  constexpr int kCols = kMaxD / 16;
  __shared__ TileShared sm;
  __shared__ float rows[kDepth][kMaxD];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t b = blockIdx.x / p.Hkv;
  const int kv_head = int(blockIdx.x % p.Hkv);
  const int64_t set = p.index != nullptr ? p.index[b] : 0;
  setup_rows(sm, int64_t(blockIdx.y) * kTile, int64_t(p.group) * p.Sq, kv_head, p.group, p.Sq);
  __syncthreads();

  const int64_t bank_offset = (set * p.Hkv + kv_head) * int64_t(p.P) * p.D;
  const SeqRows<T> Q{p.q.data + b * p.q.sb, p.q.sh, p.q.ss, sm.row_h, sm.row_s, p.D};

  // The sequence part as a running softmax state; rows that saw no key start empty.
  float m[4], l[4], acc[4][kCols];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int h = sm.row_h[ty * 4 + u], s = sm.row_s[ty * 4 + u];
    const float l1 = h >= 0 ? p.seq_lse.data[b * p.seq_lse.sb + h * p.seq_lse.sh + s * p.seq_lse.ss] : -INFINITY;
    const bool seen = l1 != -INFINITY;
    const T* o1 = p.seq_out.data + b * p.seq_out.sb + int64_t(seen ? h : 0) * p.seq_out.sh + s * p.seq_out.ss;
    m[u] = l1;
    l[u] = seen ? 1.0f : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = tx + 16 * c;
      acc[u][c] = (seen && d < p.D) ? static_cast<float>(o1[d]) : 0.0f;
    }
  }

  for (int key0 = 0; key0 < p.P; key0 += kTile) {
    float s[4][4];
    tile_dot(Q, PrefixRows<T>{p.prefix_k + bank_offset, key0, p.P, p.D}, p.D, sm, s);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float row_max = -INFINITY;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        s[u][v] = key0 + tx + 16 * v < p.P ? s[u][v] * p.scale : -INFINITY;
        row_max = fmaxf(row_max, s[u][v]);
      }
      // Finite: key0 itself is a valid key, so some lane of the row holds a real score.
      const float m_new = fmaxf(m[u], max16(row_max));
      const float alpha = expf(m[u] - m_new);     // 0 while the state is empty (m = -inf)
      float row_sum = 0.0f;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        s[u][v] = expf(s[u][v] - m_new);
        row_sum += s[u][v];
        sm.w[ty * 4 + u][tx + 16 * v] = s[u][v];
      }
      l[u] = l[u] * alpha + sum16(row_sum);
      m[u] = m_new;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[u][c] *= alpha;
    }
    __syncthreads();
    accumulate_rows<kMaxD>(PrefixRows<T>{p.prefix_v + bank_offset, key0, p.P, p.D}, min(kTile, p.P - key0), sm, rows,
                           acc);
  }

#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int h = sm.row_h[ty * 4 + u], s = sm.row_s[ty * 4 + u];
    if (h < 0) continue;
    // Written by the thread that read the same entries of seq_out above, so out may alias it.
    T* o = p.out.data + b * p.out.sb + h * p.out.sh + s * p.out.ss;
    const bool any = l[u] > 0.0f;  // false only with no prefix and no visible key
    const float inv = any ? 1.0f / l[u] : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = tx + 16 * c;
      if (d < p.D) o[d] = static_cast<T>(acc[u][c] * inv);
    }
    if (tx == 0) p.lse[(b * p.H + h) * p.Sq + s] = any ? m[u] + logf(l[u]) : -INFINITY;
  }
}

template <typename T>
struct BackwardParams {
  View<const T> q, grad_out;
  View<T> grad_q;
  const float* lse;  // [B, H, Sq] contiguous, merged
  const float* delta;  // [B, H, Sq]: rowsum(grad_out * out)
  const T* prefix_k;
  const T* prefix_v;
  const int64_t* index;
  float* grad_prefix_k;  // fp32 [N, Hkv, P, D]
  float* grad_prefix_v;
  int64_t H, Hkv, Sq;
  int P, D, group;
  float scale;
  int64_t tiles_per_split;
};

// delta[row] = sum_d a[row][d] * b[row][d], one warp per row.
template <typename T>
__global__ void row_dot_kernel(const View<const T> a, const View<const T> b, float* out, int64_t H, int64_t Sq,
                               int D, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const int64_t bb = row / (H * Sq), h = (row / Sq) % H, s = row % Sq;
  const T* x = a.data + bb * a.sb + h * a.sh + s * a.ss;
  const T* y = b.data + bb * b.sb + h * b.sh + s * b.ss;
  float sum = 0.0f;
  for (int d = lane; d < D; d += 32) sum = fmaf(static_cast<float>(x[d]), static_cast<float>(y[d]), sum);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) out[row] = sum;
}

template <typename T, int kMaxD>
__global__ void __launch_bounds__(kThreads) prefix_grad_q_kernel(const BackwardParams<T> p) {
  constexpr int kCols = kMaxD / 16;
  __shared__ TileShared sm;
  __shared__ float rows[kDepth][kMaxD];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t b = blockIdx.x / p.Hkv;
  const int kv_head = int(blockIdx.x % p.Hkv);
  const int64_t set = p.index != nullptr ? p.index[b] : 0;
  setup_rows(sm, int64_t(blockIdx.y) * kTile, int64_t(p.group) * p.Sq, kv_head, p.group, p.Sq);
  __syncthreads();

  const int64_t bank_offset = (set * p.Hkv + kv_head) * int64_t(p.P) * p.D;
  const SeqRows<T> Q{p.q.data + b * p.q.sb, p.q.sh, p.q.ss, sm.row_h, sm.row_s, p.D};
  const SeqRows<T> dO{p.grad_out.data + b * p.grad_out.sb, p.grad_out.sh, p.grad_out.ss, sm.row_h, sm.row_s, p.D};
  float lse[4], delta[4], dq[4][kCols];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int h = sm.row_h[ty * 4 + u], s = sm.row_s[ty * 4 + u];
    const int64_t r = (b * p.H + (h >= 0 ? h : 0)) * p.Sq + s;
    lse[u] = h >= 0 ? p.lse[r] : INFINITY;  // rows past the end get p = 0
    delta[u] = h >= 0 ? p.delta[r] : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) dq[u][c] = 0.0f;
  }

  for (int key0 = 0; key0 < p.P; key0 += kTile) {
    const PrefixRows<T> K{p.prefix_k + bank_offset, key0, p.P, p.D};
    float s[4][4], dp[4][4];
    tile_dot(Q, K, p.D, sm, s);
    tile_dot(dO, PrefixRows<T>{p.prefix_v + bank_offset, key0, p.P, p.D}, p.D, sm, dp);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float prob = key0 + tx + 16 * v < p.P ? expf(s[u][v] * p.scale - lse[u]) : 0.0f;
        sm.w[ty * 4 + u][tx + 16 * v] = prob * (dp[u][v] - delta[u]);
      }
    __syncthreads();
    accumulate_rows<kMaxD>(K, min(kTile, p.P - key0), sm, rows, dq);
  }

#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int h = sm.row_h[ty * 4 + u], s = sm.row_s[ty * 4 + u];
    if (h < 0) continue;
    T* g = p.grad_q.data + b * p.grad_q.sb + h * p.grad_q.sh + s * p.grad_q.ss;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = tx + 16 * c;
      if (d < p.D) g[d] = static_cast<T>(static_cast<float>(g[d]) + p.scale * dq[u][c]);
    }
  }
}

template <typename T, int kMaxD>
__global__ void __launch_bounds__(kThreads) prefix_grad_bank_kernel(const BackwardParams<T> p) {
  constexpr int kCols = kMaxD / 16;
  __shared__ TileShared sm;
  __shared__ float rows[kDepth][kMaxD];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t b = blockIdx.x / p.Hkv;
  const int kv_head = int(blockIdx.x % p.Hkv);
  const int key0 = int(blockIdx.y) * kTile;
  const int64_t set = p.index != nullptr ? p.index[b] : 0;
  const int64_t row_count = int64_t(p.group) * p.Sq;
  const int64_t tiles = (row_count + kTile - 1) / kTile;
  const int64_t tile_begin = int64_t(blockIdx.z) * p.tiles_per_split;
  const int64_t tile_end = min(tiles, tile_begin + p.tiles_per_split);

  const int64_t bank_offset = (set * p.Hkv + kv_head) * int64_t(p.P) * p.D;
  const PrefixRows<T> K{p.prefix_k + bank_offset, key0, p.P, p.D};
  const PrefixRows<T> V{p.prefix_v + bank_offset, key0, p.P, p.D};
  const SeqRows<T> Q{p.q.data + b * p.q.sb, p.q.sh, p.q.ss, sm.row_h, sm.row_s, p.D};
  const SeqRows<T> dO{p.grad_out.data + b * p.grad_out.sb, p.grad_out.sh, p.grad_out.ss, sm.row_h, sm.row_s, p.D};

  float dk[4][kCols], dv[4][kCols];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int c = 0; c < kCols; ++c) dk[u][c] = dv[u][c] = 0.0f;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    // The previous tile's last accumulate_rows ended with a barrier, so the row table is free.
    setup_rows(sm, tile * kTile, row_count, kv_head, p.group, p.Sq);
    if (threadIdx.x < kTile) {
      const int i = threadIdx.x, h = sm.row_h[i];
      const int64_t r = (b * p.H + (h >= 0 ? h : 0)) * p.Sq + sm.row_s[i];
      sm.row_lse[i] = h >= 0 ? p.lse[r] : INFINITY;
      sm.row_delta[i] = h >= 0 ? p.delta[r] : 0.0f;
    }
    __syncthreads();
    // Transposed tiles: entry (u, v) is prefix key key0 + ty*4 + u against tile row tx + 16v.
    float s[4][4], dp[4][4];
    tile_dot(K, Q, p.D, sm, s);
    tile_dot(V, dO, p.D, sm, dp);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int row = tx + 16 * v;
        const float prob = key0 + ty * 4 + u < p.P ? expf(s[u][v] * p.scale - sm.row_lse[row]) : 0.0f;
        sm.w[ty * 4 + u][row] = prob;
        dp[u][v] = prob * (dp[u][v] - sm.row_delta[row]);  // now ds
      }
    __syncthreads();
    accumulate_rows<kMaxD>(dO, kTile, sm, rows, dv);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) sm.w[ty * 4 + u][tx + 16 * v] = dp[u][v];
    __syncthreads();
    accumulate_rows<kMaxD>(Q, kTile, sm, rows, dk);
  }

  if (tile_begin >= tile_end) return;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int key = key0 + ty * 4 + u;
    if (key >= p.P) continue;
    const int64_t base = bank_offset + int64_t(key) * p.D;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = tx + 16 * c;
      if (d < p.D) {
        atomicAdd(p.grad_prefix_k + base + d, p.scale * dk[u][c]);
        atomicAdd(p.grad_prefix_v + base + d, dv[u][c]);
      }
    }
  }
}

// Instantiates `f` for the smallest supported head-size bucket that holds D.
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  TORCH_CHECK(D <= 256, "fastpeft.prefix_attention: the CUDA kernels support head sizes D <= 256, got D = ", D);
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

void check_grid(int64_t x, int64_t y, const char* what) {
  TORCH_CHECK(x <= 0x7fffffff && y <= 65535, "fastpeft.prefix_attention: ", what, " too large for one launch (",
              x, " x ", y, " blocks)");
}

const int64_t* index_ptr(const at::Tensor& prefix_index) {
  return prefix_index.defined() ? prefix_index.data_ptr<int64_t>() : nullptr;
}

}  // namespace

void prefix_merge_forward_cuda(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                               const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                               const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = prefix_k.size(1);
  const int64_t group = H / Hkv;
  const dim3 grid(B * Hkv, (group * Sq + kTile - 1) / kTile);
  check_grid(int64_t(B) * Hkv, (group * Sq + kTile - 1) / kTile, "batch x heads x sequence");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_merge_forward_cuda", [&] {
    ForwardParams<scalar_t> p;
    p.q = view_of<const scalar_t>(q);
    p.seq_out = view_of<const scalar_t>(seq_out);
    p.seq_lse = view_of<const float>(seq_lse);
    p.out = view_of<scalar_t>(out);
    p.lse = lse.data_ptr<float>();
    p.prefix_k = prefix_k.data_ptr<scalar_t>();
    p.prefix_v = prefix_v.data_ptr<scalar_t>();
    p.index = index_ptr(prefix_index);
    p.H = H, p.Hkv = Hkv, p.Sq = Sq;
    p.P = int(prefix_k.size(2)), p.D = int(D), p.group = int(group);
    p.scale = static_cast<float>(scale);
    dispatch_head_dim(D, [&](auto max_d) {
      prefix_forward_kernel<scalar_t, decltype(max_d)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void prefix_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                          const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                          const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                          at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = prefix_k.size(1);
  const int64_t P = prefix_k.size(2), group = H / Hkv;
  const int64_t rows = B * H * Sq;
  const int64_t row_tiles = (group * Sq + kTile - 1) / kTile;
  check_grid(B * Hkv, row_tiles, "batch x heads x sequence");
  auto delta = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_backward_cuda", [&] {
    constexpr int kWarps = 8;
    row_dot_kernel<scalar_t><<<(rows + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
        view_of<const scalar_t>(grad_out), view_of<const scalar_t>(out), delta.data_ptr<float>(), H, Sq, int(D), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    BackwardParams<scalar_t> p;
    p.q = view_of<const scalar_t>(q);
    p.grad_out = view_of<const scalar_t>(grad_out);
    p.grad_q = grad_q.defined() ? view_of<scalar_t>(grad_q) : View<scalar_t>{nullptr, 0, 0, 0};
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.prefix_k = prefix_k.data_ptr<scalar_t>();
    p.prefix_v = prefix_v.data_ptr<scalar_t>();
    p.index = index_ptr(prefix_index);
    p.grad_prefix_k = grad_prefix_k.defined() ? grad_prefix_k.data_ptr<float>() : nullptr;
    p.grad_prefix_v = grad_prefix_v.defined() ? grad_prefix_v.data_ptr<float>() : nullptr;
    p.H = H, p.Hkv = Hkv, p.Sq = Sq;
    p.P = int(P), p.D = int(D), p.group = int(group);
    p.scale = static_cast<float>(scale);

    if (grad_q.defined()) {
      dispatch_head_dim(D, [&](auto max_d) {
        prefix_grad_q_kernel<scalar_t, decltype(max_d)::value>
            <<<dim3(B * Hkv, row_tiles), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (grad_prefix_k.defined()) {
      // Split each group's rows so the grid fills the GPU; more splits mean more atomics per entry.
      const int64_t key_tiles = (P + kTile - 1) / kTile;
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t base_blocks = B * Hkv * key_tiles;
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(row_tiles, (2 * sms + base_blocks - 1) / base_blocks));
      p.tiles_per_split = (row_tiles + splits - 1) / splits;
      const int64_t used_splits = (row_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
      check_grid(B * Hkv, key_tiles, "batch x heads x prefix");
      dispatch_head_dim(D, [&](auto max_d) {
        prefix_grad_bank_kernel<scalar_t, decltype(max_d)::value>
            <<<dim3(B * Hkv, key_tiles, used_splits), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
}

}  // namespace fastpeft
