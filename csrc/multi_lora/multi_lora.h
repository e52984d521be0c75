// Several LoRA adapters in one batch: shared declarations of the op bodies and device kernels.
//
// Routing. Row m of x (a token) uses adapter a(m) in [0, N) or none (-1). A "plan", made once per
// batch by multi_lora_plan and shared by every layer, sorts the rows by adapter:
//   sorted_rows  int32 [M]       row ids, grouped by adapter (stable), rows with no adapter last;
//   offsets      int32 [3, N+1]  offsets[0][a] .. offsets[0][a+1] is adapter a's segment of
//                                sorted_rows; offsets[1][a] is the number of kRowsPerTile-row tiles
//                                of the segments before a (CUDA kernels map blocks to tiles);
//                                offsets[2][a] is where adapter a's rows start in the grouped
//                                layout, where every segment is padded with zero rows to a multiple
//                                of kMultiLoraGroupAlign (the row offsets of a grouped GEMM must be
//                                16-byte aligned for its TMA loads).
// Everything that depends on the indices stays on the device: no host sync after the plan.
//
// Mixed ranks. Adapters are separate tensors (lora_A[i] [r_i, K], lora_B[i] [O, r_i]); kernels
// read them through a table of pointers, so nothing is stacked or copied per call. The [M, r_max]
// shrink activation is padded to the largest rank (zeros past r_{a(m)}): its ragged size depends
// on the indices, which the host does not see.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/dropout_mask.h"

namespace fastpeft {

// Rows per tile of the row-tiled CUDA kernels; the plan counts tiles of this height.
constexpr int64_t kMultiLoraRowsPerTile = 64;
// Row granularity of the grouped layout (8 rows: 16 bytes of a bf16/fp16 column, 32 of fp32).
constexpr int64_t kMultiLoraGroupAlign = 8;

// The validated adapter bank of one call.
struct AdapterBank {
  std::vector<at::Tensor> A;  // [r_i, K], contiguous, x's dtype and device
  std::vector<at::Tensor> B;  // [O, r_i], contiguous
  std::vector<int64_t> ranks;
  std::vector<int64_t> rank_offsets;  // sum of the ranks before i
  std::vector<double> scalings;
  std::vector<DropoutMask> dropout;  // per adapter; p = 0 keeps everything at factor 1
  bool any_dropout = false;
  int64_t in_features = 0, out_features = 0, max_rank = 0, total_rank = 0;
  // CUDA: the table of adapter pointers, uploaded by the first kernel of a call and reused by the
  // others of that call.
  mutable at::Tensor device_table;
  // Grouped path: the bank stacked once per call (multi_lora_grouped.cpp), zero-padded to R (the
  // largest rank rounded up to 8): A as [N, R, K], B as [N, O, R], unscaled.
  mutable at::Tensor stacked_A, stacked_B;

  size_t size() const { return ranks.size(); }
};

// The validated routing of one call (tensors on x's device).
struct RowPlan {
  at::Tensor sorted_rows;  // int32 [M]
  at::Tensor offsets;      // int32 [2, N+1]
  int64_t rows = 0;
  int64_t num_adapters = 0;
  // Upper bound on the number of row tiles, known without reading the device: every segment
  // adds at most one partial tile.
  int64_t max_tiles() const {
    return (rows + kMultiLoraRowsPerTile - 1) / kMultiLoraRowsPerTile + std::min(rows, num_adapters);
  }
  // Upper bound on the rows of the grouped layout: every segment adds at most kMultiLoraGroupAlign - 1.
  int64_t max_grouped_rows() const { return rows + (kMultiLoraGroupAlign - 1) * std::min(rows, num_adapters); }
  // Where each group of the grouped layout ends (offsets[2][1:]): the `offs` of a grouped GEMM. A
  // copy (N int32, once per call): a fresh allocation is 16-byte aligned, a view into offsets
  // starts 4 bytes past such a boundary, and the grouped GEMM's setup kernel may load it in vectors.
  at::Tensor group_ends() const { return offsets[2].narrow(0, 1, num_adapters).clone(); }
};

// Which implementation runs the low-rank parts of one call (multi_lora_path.cpp).
enum class MultiLoraPath {
  kSegment,  // row-tiled segment kernels (CPU: gather + MKL per segment; CUDA: SGMV-style tiles)
  kGrouped,  // grouped layout + at::_grouped_mm (CUTLASS grouped GEMM on sm90/sm100 in bf16)
  kBgmv,     // CUDA forward for decode-like batches: one row per block, 16-byte loads (BGMV)
};
MultiLoraPath choose_multi_lora_path(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan, bool backward);

// Device kernels. x, grad_out, grad_x, out: contiguous [M, K] / [M, O]; shrink, grad_shrink:
// contiguous [M, r_max]; all validated by the op bodies in multi_lora.cpp, with M > 0 and N > 0.
struct MultiLoraKernels {
  // [M, r_max]: row m holds dropout_a(x_m) A_a^T in its first r_a columns, zeros elsewhere.
  at::Tensor (*shrink)(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan);
  // out_m += scaling_a * shrink_m[:r_a] B_a^T for every row with an adapter.
  void (*expand_)(at::Tensor& out, const at::Tensor& shrink, const AdapterBank& bank, const RowPlan& plan);
  // [M, r_max]: scaling_a * g_m B_a in the first r_a columns, zeros elsewhere.
  at::Tensor (*grad_shrink)(const at::Tensor& grad_out, const AdapterBank& bank, const RowPlan& plan);
  // grad_x_m += mask_a(m) * (grad_shrink_m[:r_a] A_a).
  void (*grad_x_accum_)(at::Tensor& grad_x, const at::Tensor& grad_shrink, const AdapterBank& bank,
                        const RowPlan& plan);
  // grad_A[i] = grad_shrink_i^T dropout_i(x_i), grad_B[i] = scaling_i * g_i^T shrink_i over the rows
  // of adapter i (zeros for an adapter no row uses). An undefined grad_A[i] / grad_B[i] is skipped.
  void (*grad_adapters)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                        const at::Tensor& grad_shrink, const AdapterBank& bank, const RowPlan& plan,
                        std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B);
};

const MultiLoraKernels& multi_lora_cpu_kernels();
#ifdef FASTPEFT_WITH_CUDA
const MultiLoraKernels& multi_lora_cuda_kernels();
#endif

// ---- grouped path (multi_lora_grouped.cpp) --------------------------------------------------------
// Rows move between the row order of x and the grouped layout (multi_lora.h, offsets[2]) in these
// per-device kernels; the GEMMs between them are at::_grouped_mm over the stacked bank.
struct MultiLoraGroupedKernels {
  // [max_grouped_rows, cols]: layout row p holds src[row(p), :cols] for the row it holds (times
  // adapter(p)'s dropout factor of each element of src when `dropout`, times its scaling when
  // `scaled`), zeros for padding rows, rows past the last group and columns past src's. src is a
  // contiguous [M, C].
  at::Tensor (*gather)(const at::Tensor& src, int64_t cols, const AdapterBank& bank, const RowPlan& plan,
                       bool dropout, bool scaled);
  // For every layout row p that holds a row and c < dst.size(1): dst[row(p), c] = v, or += v when
  // `accumulate`, with v = src[p, c] (times the dropout factor of dst's element when `dropout`,
  // times the adapter's scaling when `scaled`). dst is a contiguous [M, C]; src [P, >= C] has a
  // contiguous last dim.
  void (*scatter)(at::Tensor& dst, const at::Tensor& src, const AdapterBank& bank, const RowPlan& plan,
                  bool accumulate, bool dropout, bool scaled);
};
const MultiLoraGroupedKernels& multi_lora_grouped_cpu_kernels();
#ifdef FASTPEFT_WITH_CUDA
const MultiLoraGroupedKernels& multi_lora_grouped_cuda_kernels();
// Whether at::_grouped_mm has its CUTLASS kernel on this device (sm90 / sm100, bf16); elsewhere it
// loops over the groups on the host after reading the offsets back (a sync per GEMM).
bool multi_lora_cuda_has_grouped_gemm(const at::Tensor& x);
// BGMV forward (multi_lora_bgmv_cuda.cu): shrink [M, r_max] and out += the expanded rows.
at::Tensor multi_lora_bgmv_shrink_cuda(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan);
void multi_lora_bgmv_expand_cuda_(at::Tensor& out, const at::Tensor& shrink, const AdapterBank& bank,
                                  const RowPlan& plan);
#endif

// The grouped forward: out += the low-rank rows, returns the [M, r_max] shrink.
at::Tensor multi_lora_grouped_forward_(at::Tensor& out, const at::Tensor& x, const AdapterBank& bank,
                                       const RowPlan& plan);
// The grouped backward: replaces each defined entry of grad_A / grad_B (a marker: that gradient is
// wanted) by the gradient, zeros for an adapter no row uses; adds the low-rank part to *grad_x when
// grad_x is given.
void multi_lora_grouped_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                                 const AdapterBank& bank, const RowPlan& plan, at::Tensor* grad_x,
                                 std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B);

}  // namespace fastpeft
