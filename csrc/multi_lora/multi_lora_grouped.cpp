// The grouped path of multi-LoRA: the low-rank GEMMs as grouped GEMMs (at::_grouped_mm; on sm90 /
// sm100 in bf16 that is CUTLASS's grouped GEMM on tensor cores, offsets read on the device).
//
// Rows are gathered from x's order into the grouped layout (multi_lora.h: adapter by adapter, each
// segment padded with zero rows to a multiple of 8, the padded starts in the plan's offsets[2]),
// multiplied against the bank stacked as [N, R, K] / [N, O, R] (R: the largest rank rounded up to 8,
// smaller adapters zero-padded), and scattered back. The gathers and scatters are this family's own
// kernels (multi_lora_cpu.cpp / multi_lora_rows_cuda.cu) because they fuse what the GEMMs cannot: the
// dropout mask on the way in, the per-adapter scaling and the accumulation into the base output on
// the way out.
//
//   forward   xg = gather(dropout(x))            [P, K]
//             sg = xg A_stack^T                  [P, R]   (grouped, 2-D x 3-D)
//             out[rows] += scaling * sg B_stack^T          (grouped, scattered with accumulation)
//             shrink[rows] = sg                  [M, r_max], saved for backward as on every path
//   backward  gg = gather(scaling * grad_out)    [P, O]
//             gsg = gg B_stack                   [P, R]   = the gradient w.r.t. the shrink
//             grad_x[rows] += mask * gsg A_stack          (grouped, scattered with accumulation)
//             grad_A = gsg^T gather(dropout(x))  [N, R, K] (grouped over the rows: 2-D x 2-D)
//             grad_B = gg^T gather(shrink)       [N, O, R]
// Padding rows are zeros in every gathered operand, so they add nothing to any product.
#include <ATen/ATen.h>

#include <algorithm>

#include "multi_lora/multi_lora.h"

namespace fastpeft {
namespace {

const MultiLoraGroupedKernels& grouped_kernels_for(const at::Tensor& x) {
#ifdef FASTPEFT_WITH_CUDA
  if (x.is_cuda()) return multi_lora_grouped_cuda_kernels();
#endif
  TORCH_CHECK(x.is_cpu(), "fastpeft.multi_lora_linear: no grouped kernels for device ", x.device());
  return multi_lora_grouped_cpu_kernels();
}

int64_t grouped_rank(const AdapterBank& bank) {
  return (bank.max_rank + kMultiLoraGroupAlign - 1) / kMultiLoraGroupAlign * kMultiLoraGroupAlign;
}

// The bank as [N, R, K] (A) and [N, O, R] (B), unscaled: the scalings are applied by the gathers
// and scatters. One stack kernel per matrix when every rank is R; else zero-padded copies.
void stack_bank(const AdapterBank& bank) {
  if (bank.stacked_A.defined()) return;
  const int64_t N = static_cast<int64_t>(bank.size()), R = grouped_rank(bank);
  const bool uniform = std::all_of(bank.ranks.begin(), bank.ranks.end(), [&](int64_t r) { return r == R; });
  if (uniform) {
    bank.stacked_A = at::stack(bank.A);
    bank.stacked_B = at::stack(bank.B);
    return;
  }
  const auto& like = bank.A[0];
  bank.stacked_A = at::zeros({N, R, bank.in_features}, like.options());
  bank.stacked_B = at::zeros({N, bank.out_features, R}, like.options());
  for (int64_t i = 0; i < N; ++i) {
    bank.stacked_A[i].narrow(0, 0, bank.ranks[i]).copy_(bank.A[i]);
    bank.stacked_B[i].narrow(1, 0, bank.ranks[i]).copy_(bank.B[i]);
  }
}

// Per-adapter gradient i of a stacked [N, ...] gradient: the slice itself when it has the adapter's
// shape (a view of one allocation, no copy), else a copy of its first `rank` entries along `dim`.
at::Tensor adapter_slice(const at::Tensor& stacked, int64_t i, int64_t dim, int64_t rank) {
  auto slice = stacked[i];
  return slice.size(dim) == rank && slice.is_contiguous() ? slice : slice.narrow(dim, 0, rank).contiguous();
}

// Grouped GEMMs over groups with no rows leave their 2-D x 2-D output undefined on some backends:
// those adapters' gradients are zeros, chosen on the device.
at::Tensor zero_unused(const at::Tensor& stacked, const RowPlan& plan) {
  const auto start = plan.offsets[0];
  const auto used = (start.narrow(0, 1, plan.num_adapters) > start.narrow(0, 0, plan.num_adapters)).view({-1, 1, 1});
  return at::where(used, stacked, at::zeros({}, stacked.options()));
}

}  // namespace

at::Tensor multi_lora_grouped_forward_(at::Tensor& out, const at::Tensor& x, const AdapterBank& bank,
                                       const RowPlan& plan) {
  const auto& k = grouped_kernels_for(x);
  stack_bank(bank);
  const auto ends = plan.group_ends();
  const auto xg = k.gather(x, bank.in_features, bank, plan, /*dropout=*/bank.any_dropout, /*scaled=*/false);
  const auto sg = at::_grouped_mm(xg, bank.stacked_A.transpose(1, 2), ends);
  const auto dg = at::_grouped_mm(sg, bank.stacked_B.transpose(1, 2), ends);
  k.scatter(out, dg, bank, plan, /*accumulate=*/true, /*dropout=*/false, /*scaled=*/true);
  auto shrink = at::zeros({plan.rows, bank.max_rank}, x.options());
  k.scatter(shrink, sg, bank, plan, /*accumulate=*/false, /*dropout=*/false, /*scaled=*/false);
  return shrink;
}

void multi_lora_grouped_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                                 const AdapterBank& bank, const RowPlan& plan, at::Tensor* grad_x,
                                 std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B) {
  const auto& k = grouped_kernels_for(x);
  stack_bank(bank);
  const auto ends = plan.group_ends();
  const int64_t R = grouped_rank(bank);
  const auto gg = k.gather(grad_out, bank.out_features, bank, plan, /*dropout=*/false, /*scaled=*/true);
  const auto gsg = at::_grouped_mm(gg, bank.stacked_B, ends);
  if (grad_x != nullptr) {
    const auto gxg = at::_grouped_mm(gsg, bank.stacked_A, ends);
    k.scatter(*grad_x, gxg, bank, plan, /*accumulate=*/true, /*dropout=*/bank.any_dropout, /*scaled=*/false);
  }
  const auto wanted = [](const std::vector<at::Tensor>& g) {
    return std::any_of(g.begin(), g.end(), [](const at::Tensor& t) { return t.defined(); });
  };
  if (wanted(grad_A)) {
    const auto xg = k.gather(x, bank.in_features, bank, plan, /*dropout=*/bank.any_dropout, /*scaled=*/false);
    const auto stacked = zero_unused(at::_grouped_mm(gsg.t(), xg, ends), plan);  // [N, R, K]
    for (size_t i = 0; i < bank.size(); ++i)
      if (grad_A[i].defined()) grad_A[i] = adapter_slice(stacked, static_cast<int64_t>(i), 0, bank.ranks[i]);
  }
  if (wanted(grad_B)) {
    const auto sg = k.gather(shrink, R, bank, plan, /*dropout=*/false, /*scaled=*/false);
    const auto stacked = zero_unused(at::_grouped_mm(gg.t(), sg, ends), plan);  // [N, O, R]
    for (size_t i = 0; i < bank.size(); ++i)
      if (grad_B[i].defined()) grad_B[i] = adapter_slice(stacked, static_cast<int64_t>(i), 1, bank.ranks[i]);
  }
}

}  // namespace fastpeft
