// Several LoRA adapters in one batch (multi-LoRA): the routing plan, validation, and the composite
// forward/backward over a frozen weight of any format (common/frozen_weights.h).
//
// The base GEMM runs once for the whole batch (ATen: cuBLAS / MKL); the per-row low-rank shrink and
// expand run in this family's gather/segment kernels and accumulate into the base output in place.
// Memory rules, as for the single-adapter op: a quantized weight is dequantized into the shared
// workspace and dropped (backward dequantizes again); dropout masks are regenerated from the seed;
// backward needs x and the [M, r_max] shrink output, nothing else of the activations.
#include "multi_lora/multi_lora.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <string>

#include "common/checks.h"
#include "common/dropout_seed.h"
#include "common/frozen_weights.h"

namespace fastpeft {
namespace {

constexpr const char* kPlanOp = "fastpeft.multi_lora_plan";
constexpr const char* kOp = "fastpeft.multi_lora_linear";

const MultiLoraKernels& kernels_for(const at::Tensor& x) {
#ifdef FASTPEFT_WITH_CUDA
  if (x.is_cuda()) return multi_lora_cuda_kernels();
#endif
  TORCH_CHECK(x.is_cpu(), kOp, ": no kernel for device ", x.device());
  return multi_lora_cpu_kernels();
}

// ---- plan ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multi_lora_plan(const at::Tensor& adapter_index, int64_t rows,
                                                   int64_t num_adapters) {
  TORCH_CHECK(adapter_index.scalar_type() == at::kInt || adapter_index.scalar_type() == at::kLong, kPlanOp,
              ": adapter_index must be int32 or int64, got ", adapter_index.scalar_type());
  TORCH_CHECK(num_adapters >= 0, kPlanOp, ": num_adapters must be >= 0, got ", num_adapters);
  TORCH_CHECK(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(), kPlanOp,
              ": rows must be in [0, 2^31), got ", rows);
  const int64_t entries = adapter_index.numel();
  TORCH_CHECK(entries > 0 ? rows % entries == 0 : rows == 0, kPlanOp, ": adapter_index has ", entries,
              " entries, which must divide the ", rows, " rows of x (one index per example or per token)");
  const auto opts32 = adapter_index.options().dtype(at::kInt);
  if (rows == 0) return {at::empty({0}, opts32), at::zeros({3, num_adapters + 1}, opts32)};

  const auto idx = adapter_index.reshape({-1});
  // The one host sync of a multi-LoRA batch: an index out of range would make the kernels read
  // another adapter's (or no) memory, so it is refused here, once per batch, not per layer.
  const auto min_max = at::aminmax(idx);
  const auto lo_hi = at::stack({std::get<0>(min_max), std::get<1>(min_max)}).to(at::kLong).cpu();
  const int64_t lo = lo_hi.data_ptr<int64_t>()[0], hi = lo_hi.data_ptr<int64_t>()[1];
  TORCH_CHECK(lo >= -1 && hi < num_adapters, kPlanOp, ": adapter_index holds ", lo < -1 ? lo : hi, " but ",
              num_adapters, " adapters are loaded; valid indices are 0..", num_adapters - 1,
              ", or -1 for the base layer alone");

  // Key of a row: its adapter, or N for "none", which sorts those rows after every segment.
  auto keys = idx.to(at::kInt).masked_fill(idx < 0, num_adapters);
  keys = keys.view({entries, 1}).expand({entries, rows / entries}).reshape({rows});
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& sorted_keys = std::get<0>(sorted);
  const auto segment_start =
      at::searchsorted(sorted_keys, at::arange(num_adapters + 1, opts32), /*out_int32=*/true, /*right=*/false);
  const auto counts = segment_start.narrow(0, 1, num_adapters) - segment_start.narrow(0, 0, num_adapters);
  const auto tiles = at::floor_divide(counts + (kMultiLoraRowsPerTile - 1), kMultiLoraRowsPerTile);
  const auto padded = at::floor_divide(counts + (kMultiLoraGroupAlign - 1), kMultiLoraGroupAlign) * kMultiLoraGroupAlign;
  auto tile_start = at::zeros({num_adapters + 1}, opts32);
  auto group_start = at::zeros({num_adapters + 1}, opts32);
  if (num_adapters > 0) {
    tile_start.narrow(0, 1, num_adapters).copy_(at::cumsum(tiles, 0));
    group_start.narrow(0, 1, num_adapters).copy_(at::cumsum(padded, 0));
  }
  return {std::get<1>(sorted).to(at::kInt), at::stack({segment_start, tile_start, group_start})};
}

// ---- validation ---------------------------------------------------------------------------------

AdapterBank check_bank(const at::Tensor& x, int64_t out_features, at::TensorList lora_A, at::TensorList lora_B,
                       at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
                       const c10::optional<at::Tensor>& seed) {
  const size_t n = lora_A.size();
  TORCH_CHECK(lora_B.size() == n && scalings.size() == n && dropout_p.size() == n, kOp,
              ": lora_A, lora_B, scalings and dropout_p must have one entry per adapter; got ", n, ", ",
              lora_B.size(), ", ", scalings.size(), ", ", dropout_p.size());
  AdapterBank bank;
  bank.in_features = x.size(-1);
  bank.out_features = out_features;
  int64_t dropout_seed = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(dropout_p[i] >= 0.0 && dropout_p[i] < 1.0, kOp, ": dropout_p[", i, "] must be in [0, 1), got ",
                dropout_p[i]);
    if (dropout_p[i] > 0.0 && !bank.any_dropout) {
      TORCH_CHECK(seed.has_value() && seed->defined(), kOp,
                  ": dropout_p > 0 needs a seed (an int64 tensor with one element)");
      dropout_mask_from(dropout_p[i], *seed, kOp);  // validates the seed: int64, one element
      dropout_seed = seed->item<int64_t>();
      bank.any_dropout = true;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const auto& A = lora_A[i];
    const auto& B = lora_B[i];
    check_dim(A, 2, kOp, "lora_A" + idx);
    check_dim(B, 2, kOp, "lora_B" + idx);
    check_dtype(A, x.scalar_type(), kOp, "lora_A" + idx, " (the dtype of x; cast the adapter to the compute dtype)");
    check_dtype(B, x.scalar_type(), kOp, "lora_B" + idx, " (the dtype of x; cast the adapter to the compute dtype)");
    check_same_device(A, x, kOp, "lora_A" + idx, "x");
    check_same_device(B, x, kOp, "lora_B" + idx, "x");
    const int64_t r = A.size(0);
    TORCH_CHECK(r >= 1, kOp, ": rank r of lora_A", idx, " must be >= 1, got ", r);
    TORCH_CHECK(A.size(1) == bank.in_features, kOp, ": lora_A", idx, " must be [r, ", bank.in_features,
                "] (x has ", bank.in_features, " features), got ", A.sizes());
    TORCH_CHECK(B.size(0) == out_features && B.size(1) == r, kOp, ": lora_B", idx, " must be [", out_features, ", ",
                r, "] (out_features x the rank of lora_A", idx, "), got ", B.sizes());
    bank.A.push_back(A.contiguous());
    bank.B.push_back(B.contiguous());
    bank.ranks.push_back(r);
    bank.rank_offsets.push_back(bank.total_rank);
    bank.scalings.push_back(scalings[i]);
    bank.dropout.push_back(make_dropout_mask(dropout_p[i], dropout_seed));
    bank.total_rank += r;
    bank.max_rank = std::max(bank.max_rank, r);
  }
  return bank;
}

RowPlan check_plan(const at::Tensor& x, int64_t num_adapters, const at::Tensor& sorted_rows,
                   const at::Tensor& offsets) {
  const int64_t rows = leading_rows(x);
  const char* hint = " (make the plan with fastpeft.ops.multi_lora.plan_multi_lora)";
  check_dtype(sorted_rows, at::kInt, kOp, "sorted_rows", hint);
  check_dtype(offsets, at::kInt, kOp, "offsets", hint);
  check_same_device(sorted_rows, x, kOp, "sorted_rows", "x");
  check_same_device(offsets, x, kOp, "offsets", "x");
  TORCH_CHECK(sorted_rows.dim() == 1 && sorted_rows.size(0) == rows, kOp, ": sorted_rows must be [", rows,
              "] (one entry per row of x), got ", sorted_rows.sizes(), "; the plan was made for another batch");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == 3 && offsets.size(1) == num_adapters + 1, kOp,
              ": offsets must be [3, ", num_adapters + 1, "] for ", num_adapters, " adapters, got ", offsets.sizes(),
              "; the plan was made for another number of adapters");
  RowPlan plan;
  plan.sorted_rows = sorted_rows.contiguous();
  plan.offsets = offsets.contiguous();
  plan.rows = rows;
  plan.num_adapters = num_adapters;
  return plan;
}

void check_x(const at::Tensor& x) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
}

void check_bias(const at::Tensor& x, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  check_dtype(*bias, x.scalar_type(), kOp, "bias", " (the dtype of x)");
  check_same_device(*bias, x, kOp, "bias", "x");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, kOp, ": bias must be [", out_features, "], got ",
              bias->sizes());
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

bool has_work(const AdapterBank& bank, const RowPlan& plan) { return plan.rows > 0 && bank.size() > 0; }

// ---- composite forward / backward -----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multi_lora_forward(const at::Tensor& x, const FrozenWeights& W,
                                                      const c10::optional<at::Tensor>& bias, const AdapterBank& bank,
                                                      const RowPlan& plan) {
  const auto x2 = as_rows(x).contiguous();
  auto w = W.materialize(0, x.scalar_type(), x.device());
  auto out = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  w = at::Tensor();  // release the workspace
  at::Tensor shrink;
  if (has_work(bank, plan)) {
    switch (choose_multi_lora_path(x, bank, plan, /*backward=*/false)) {
      case MultiLoraPath::kGrouped:
        shrink = multi_lora_grouped_forward_(out, x2, bank, plan);
        break;
#ifdef FASTPEFT_WITH_CUDA
      case MultiLoraPath::kBgmv:
        shrink = multi_lora_bgmv_shrink_cuda(x2, bank, plan);
        multi_lora_bgmv_expand_cuda_(out, shrink, bank, plan);
        break;
#endif
      default: {
        const auto& k = kernels_for(x);
        shrink = k.shrink(x2, bank, plan);
        k.expand_(out, shrink, bank, plan);
      }
    }
  } else {
    shrink = at::zeros({plan.rows, bank.max_rank}, x.options());
  }
  return {out.view(with_last(x.sizes(), bank.out_features)), shrink};
}

struct Grads {
  at::Tensor x, weight, bias;
  std::vector<at::Tensor> A, B;
};

// need: [x, weight, bias]; adapter_grads: per adapter, whether lora_A[i] / lora_B[i] need gradients.
Grads multi_lora_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                          const FrozenWeights& W, const AdapterBank& bank, const RowPlan& plan,
                          std::array<bool, 3> need, const c10::List<bool>& adapter_grads) {
  const int64_t M = plan.rows, K = bank.in_features, O = bank.out_features;
  TORCH_CHECK(adapter_grads.size() == bank.size(), kOp, "_backward: adapter_grads must have one entry per adapter (",
              bank.size(), "), got ", adapter_grads.size());
  check_dtype(grad_out, x.scalar_type(), kOp, "grad_out", " (the dtype of x)");
  TORCH_CHECK(grad_out.numel() == M * O, kOp, "_backward: grad_out has shape ", grad_out.sizes(), ", expected [..., ",
              O, "] with ", M, " rows");
  check_dtype(shrink, x.scalar_type(), kOp, "shrink", " (the dtype of x)");
  TORCH_CHECK(shrink.dim() == 2 && shrink.size(0) == M && shrink.size(1) == bank.max_rank, kOp,
              "_backward: shrink must be [", M, ", ", bank.max_rank, "], got ", shrink.sizes());
  const auto g2 = grad_out.reshape({M, O}).contiguous();
  const auto x2 = x.reshape({M, K}).contiguous();
  const bool work = has_work(bank, plan);
  bool any_adapter = false;
  for (const bool b : adapter_grads) any_adapter = any_adapter || b;

  const bool grouped = work && choose_multi_lora_path(x, bank, plan, /*backward=*/true) == MultiLoraPath::kGrouped;
  Grads grads;
  at::Tensor grad_shrink;
  if (work && !grouped && (need[0] || any_adapter)) grad_shrink = kernels_for(x).grad_shrink(g2, bank, plan);
  std::vector<at::Tensor> gA(bank.size()), gB(bank.size());
  for (size_t i = 0; i < bank.size(); ++i) {
    if (!adapter_grads[i]) continue;
    if (grouped) {  // a marker: the grouped backward replaces it by a slice of its stacked gradient
      gA[i] = gB[i] = at::empty({0}, x.options());
      continue;
    }
    gA[i] = at::empty({bank.ranks[i], K}, x.options());
    gB[i] = at::empty({O, bank.ranks[i]}, x.options());
    if (!work) {
      gA[i].zero_();
      gB[i].zero_();
    }
  }
  at::Tensor gx;
  if (need[0]) {
    auto w = W.materialize(0, x.scalar_type(), x.device());
    gx = at::mm(g2, w);
  }
  if (grouped) {
    // One pass over the grouped layout serves grad_x and every adapter's gradients.
    if (need[0] || any_adapter)
      multi_lora_grouped_backward(g2, x2, shrink.contiguous(), bank, plan, need[0] ? &gx : nullptr, gA, gB);
  } else if (work) {
    if (any_adapter) kernels_for(x).grad_adapters(g2, x2, shrink.contiguous(), grad_shrink, bank, plan, gA, gB);
    if (need[0]) kernels_for(x).grad_x_accum_(gx, grad_shrink, bank, plan);
  }
  for (size_t i = 0; i < bank.size(); ++i) {
    grads.A.push_back(gA[i].defined() ? gA[i] : at::empty({0}, x.options()));
    grads.B.push_back(gB[i].defined() ? gB[i] : at::empty({0}, x.options()));
  }
  if (need[0]) {
    grads.x = gx.view(x.sizes());
  } else {
    grads.x = at::empty({0}, x.options());
  }
  if (need[1]) {
    TORCH_CHECK(!W.quantized(), kOp, "_backward: quantized weights are frozen and have no gradient");
    grads.weight = at::mm(g2.t(), x2);
  } else {
    grads.weight = at::empty({0}, x.options());
  }
  grads.bias = need[2] ? g2.sum(0) : at::empty({0}, x.options());
  return grads;
}

// ---- op entry points ----------------------------------------------------------------------------

FrozenWeights parse_weight(const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
                           at::IntArrayRef weight_ints) {
  FrozenWeights W;
  W.items.push_back(parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp));
  W.format = W.items[0].format;
  return W;
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear(const at::Tensor& x, c10::string_view weight_format,
                                                     const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                                                     const c10::optional<at::Tensor>& bias, at::TensorList lora_A,
                                                     at::TensorList lora_B, at::ArrayRef<double> scalings,
                                                     at::ArrayRef<double> dropout_p, const c10::optional<at::Tensor>& seed,
                                                     const at::Tensor& sorted_rows, const at::Tensor& offsets) {
  check_x(x);
  const auto W = parse_weight(x, weight_format, weight_tensors, weight_ints);
  check_bias(x, W[0].out_features, bias);
  const auto bank = check_bank(x, W[0].out_features, lora_A, lora_B, scalings, dropout_p, seed);
  const auto plan = check_plan(x, bank.size(), sorted_rows, offsets);
  return multi_lora_forward(x, W, bias, bank, plan);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
multi_lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                           c10::string_view weight_format, const OptTensorList& weight_tensors,
                           at::IntArrayRef weight_ints, at::TensorList lora_A, at::TensorList lora_B,
                           at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
                           const c10::optional<at::Tensor>& seed, const at::Tensor& sorted_rows,
                           const at::Tensor& offsets, const c10::List<bool>& output_mask,
                           const c10::List<bool>& adapter_grads) {
  check_x(x);
  const auto W = parse_weight(x, weight_format, weight_tensors, weight_ints);
  const auto bank = check_bank(x, W[0].out_features, lora_A, lora_B, scalings, dropout_p, seed);
  const auto plan = check_plan(x, bank.size(), sorted_rows, offsets);
  TORCH_CHECK(output_mask.size() == 3, kOp, "_backward: output_mask must have 3 entries [x, weight, bias], got ",
              output_mask.size());
  auto g = multi_lora_backward(grad_out, x, shrink, W, bank, plan, {output_mask[0], output_mask[1], output_mask[2]},
                               adapter_grads);
  return {g.x, g.A, g.B, g.weight, g.bias};
}

}  // namespace

// One body serves every device: the GEMMs go to ATen, the routed pieces to kernels_for(x).
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("multi_lora_plan", &multi_lora_plan);
  m.impl("multi_lora_linear", &multi_lora_linear);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward);
}

}  // namespace fastpeft
