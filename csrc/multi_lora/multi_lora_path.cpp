// Which implementation runs the low-rank parts of a multi-LoRA call.
//
// Three are built (multi_lora.h, MultiLoraPath):
//   segment  the row-tiled segment kernels (CPU: gather + MKL per segment; CUDA: SGMV-style tiles in
//            fp32 FMA). Every dtype, shape and batch.
//   grouped  rows gathered into the grouped layout, the GEMMs as at::_grouped_mm over the stacked
//            bank (CUTLASS, tensor cores), rows scattered back. On CUDA only where _grouped_mm has
//            its device kernel (bf16 on sm90 / sm100) and rows are 16-byte aligned.
//   bgmv     CUDA forward of decode-like batches (a few rows per adapter): one block per row,
//            16-byte loads of the adapter; the backward of such batches runs the segment kernels.
// The choice is a pure function of host-known facts (device, dtype, shapes, rows and adapters), so
// forward and backward of one call agree and nothing is read back from the device.
//
// FASTPEFT_MULTI_LORA_PATH=segment|grouped|bgmv forces one (tests run each path with it; a forced
// grouped path on a device without the grouped kernel takes ATen's fallback, which loops on the
// host); unset or "auto" chooses as below.
#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "multi_lora/multi_lora.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.multi_lora_linear";

// Rows per adapter (on average over the bank) at and above which the grouped GEMM replaces the
// segment kernels, and at and below which the forward runs BGMV. Estimates from the kernels' design
// (issue 16): a 64-row tile of the segment kernel is 1/64 used by a one-row segment, and a grouped
// GEMM tile of 128 rows is mostly padding below ~32 rows. To be measured by bench_multi_lora.py on
// a GPU (its path rows); FASTPEFT_MULTI_LORA_PATH overrides.
constexpr int64_t kGroupedMinRowsPerAdapter = 32;
constexpr int64_t kBgmvMaxRowsPerAdapter = 4;

bool rows_aligned(const at::Tensor& x, int64_t cols) { return (cols * x.element_size()) % 16 == 0; }

// The grouped layout's GEMM operands need 16-byte aligned row strides: x's K, the output's O (the
// stacked rank is padded to a multiple of 8 elements).
bool grouped_shapes_ok(const at::Tensor& x, const AdapterBank& bank) {
  return rows_aligned(x, bank.in_features) && rows_aligned(x, bank.out_features);
}

std::string forced_path() {
  const char* env = std::getenv("FASTPEFT_MULTI_LORA_PATH");
  return env == nullptr ? std::string() : std::string(env);
}

}  // namespace

MultiLoraPath choose_multi_lora_path(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan,
                                     bool backward) {
  const std::string forced = forced_path();
  if (forced == "segment") return MultiLoraPath::kSegment;
  if (forced == "grouped") {
    TORCH_CHECK(grouped_shapes_ok(x, bank), kOp, ": FASTPEFT_MULTI_LORA_PATH=grouped needs in_features (",
                bank.in_features, ") and out_features (", bank.out_features, ") to be multiples of ",
                16 / x.element_size(), " for ", x.scalar_type(), " (16-byte rows for the grouped GEMM)");
    return MultiLoraPath::kGrouped;
  }
  if (forced == "bgmv") {
    TORCH_CHECK(x.is_cuda(), kOp, ": FASTPEFT_MULTI_LORA_PATH=bgmv is a CUDA kernel; x is on ", x.device());
    return backward ? MultiLoraPath::kSegment : MultiLoraPath::kBgmv;
  }
  TORCH_CHECK(forced.empty() || forced == "auto", kOp, ": FASTPEFT_MULTI_LORA_PATH must be auto, segment, grouped ",
              "or bgmv, got '", forced, "'");

  // The CPU's segment path is already one MKL GEMM per segment, what _grouped_mm does there too.
  if (!x.is_cuda()) return MultiLoraPath::kSegment;
#ifdef FASTPEFT_WITH_CUDA
  const int64_t adapters = std::max<int64_t>(1, plan.num_adapters);
  // (BGMV's expand stages a row's shrink in shared memory: ranks up to 4096 keep it at 16 KB.)
  if (!backward && plan.rows <= kBgmvMaxRowsPerAdapter * adapters && bank.max_rank <= 4096) return MultiLoraPath::kBgmv;
  if (plan.rows >= kGroupedMinRowsPerAdapter * adapters && grouped_shapes_ok(x, bank) &&
      multi_lora_cuda_has_grouped_gemm(x))
    return MultiLoraPath::kGrouped;
#endif
  return MultiLoraPath::kSegment;
}

}  // namespace fastpeft
