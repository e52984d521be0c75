// A frozen linear layer with (IA)^3, forward and backward, over any frozen-weight format
// (common/frozen_weights.h: dense, bitsandbytes 4-bit, bitsandbytes int8).
//
// Where the scaling goes (the point of the op):
//  - one task on a 4-bit base: the vector is folded into the dequantization (rows of W for the
//    output side, columns for the feed-forward side), so scaling costs no pass over activations;
//  - otherwise (dense base, or a mixed-task batch): output side scales the GEMM output in place
//    (one epilogue pass), feed-forward side scales x into the GEMM input (one pass).
// What backward keeps: the output y for the output side (grad of l is sum(grad * y) / l, so the
// unscaled GEMM output is never kept next to y), x for the feed-forward side. The dequantized
// weight is never kept: backward dequantizes again.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/frozen_weights.h"
#include "common/workspace.h"
#include "ia3/ia3.h"
#include "quant4bit/quant4bit.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.ia3_linear";

at::Tensor materialize(const FrozenWeight& W, const at::Tensor& like) {
  return W.materialize(like.scalar_type(), like.device());
}

// A 4-bit W with the single task's vector folded into its dequantization: diag(l) W (dim 0) or
// W diag(l) (dim 1).
at::Tensor materialize_scaled(const FrozenWeight& W, const at::Tensor& like, const at::Tensor& vectors, int64_t dim) {
  auto w = dequant_workspace(W.out_features * W.in_features, like.scalar_type(), like.device())
               .view({W.out_features, W.in_features});
  dequantize_4bit_scaled_into(W.quant, vectors.select(0, 0), dim, w);
  return w;
}

void check_bias(const at::Tensor& x, const FrozenWeight& W, const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  check_dtype(*bias, x.scalar_type(), kOp, "bias", " (the dtype of x)");
  check_same_device(*bias, x, kOp, "bias", "x");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == W.out_features, kOp, ": bias must be [", W.out_features,
              "], got ", bias->sizes());
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

at::Tensor base_linear(const at::Tensor& x2, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
}

at::Tensor ia3_forward(const at::Tensor& x, const FrozenWeight& W, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& vectors_in, const c10::optional<at::Tensor>& task_ids, bool is_feedforward) {
  const int64_t K = x.size(-1), O = W.out_features;
  const auto tasks = make_task_map(x, is_feedforward ? K : O, vectors_in, task_ids, kOp);
  check_bias(x, W, bias);
  const auto vectors = vectors_in.contiguous();
  const auto x2 = as_rows(x).contiguous();
  const bool fold = W.is_4bit() && tasks.single();
  at::Tensor out;
  if (is_feedforward) {
    if (fold) {
      out = base_linear(x2, materialize_scaled(W, x, vectors, /*dim=*/1), bias);
    } else {
      auto xs = at::empty_like(x2);
      ia3_scale_into(x2, xs, vectors, tasks);
      out = base_linear(xs, materialize(W, x), bias);
    }
  } else if (fold) {
    // (x W^T + b) * l == x (diag(l) W)^T + b * l
    c10::optional<at::Tensor> scaled_bias;
    if (bias.has_value() && bias->defined()) scaled_bias = (bias->to(at::kFloat) * vectors[0].to(at::kFloat)).to(x.scalar_type());
    out = base_linear(x2, materialize_scaled(W, x, vectors, /*dim=*/0), scaled_bias);
  } else {
    out = base_linear(x2, materialize(W, x), bias);
    ia3_scale_into(out, out, vectors, tasks);  // epilogue in place: no second [M, O] tensor
  }
  return out.view(with_last(x.sizes(), O));
}

// output_mask: [x, vectors]. `saved` is y (output side) or x (feed-forward).
std::tuple<at::Tensor, at::Tensor> ia3_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                                                const FrozenWeight& W, const at::Tensor& vectors_in,
                                                const c10::optional<at::Tensor>& task_ids, bool is_feedforward,
                                                const c10::List<bool>& output_mask) {
  constexpr const char* op = "fastpeft.ia3_linear_backward";
  TORCH_CHECK(output_mask.size() == 2, op, ": output_mask must have 2 entries, got ", output_mask.size());
  const bool need_x = output_mask[0], need_v = output_mask[1];
  const int64_t O = W.out_features;
  const int64_t K = W.in_features;
  if (is_feedforward) {
    TORCH_CHECK(saved.size(-1) == K, op, ": saved (x) must have ", K, " features, got shape ", saved.sizes());
  }
  const auto tasks = make_task_map(saved, is_feedforward ? K : O, vectors_in, task_ids, op);
  check_dtype(grad_out, saved.scalar_type(), op, "grad_out", " (the dtype of saved)");
  const auto vectors = vectors_in.contiguous();
  const int64_t M = saved.size(-1) == 0 ? 0 : saved.numel() / saved.size(-1);
  TORCH_CHECK(grad_out.numel() == M * O, op, ": grad_out has shape ", grad_out.sizes(), ", expected [..., ", O,
              "] with ", M, " rows");
  const auto g2 = grad_out.reshape({M, O}).contiguous();
  const auto s2 = saved.reshape({M, saved.size(-1)}).contiguous();
  std::vector<int64_t> x_shape(saved.sizes().begin(), saved.sizes().end());
  x_shape.back() = K;

  at::Tensor grad_x = at::empty({0}, saved.options());
  at::Tensor grad_v = at::empty({0}, vectors.options());
  if (is_feedforward) {
    // y = (x * l) W^T: d(x * l) = g W, then grad_x = (g W) * l and grad_l = sum((g W) * x).
    if (!need_x && !need_v) return {grad_x, grad_v};
    auto gw = at::mm(g2, materialize(W, saved));
    if (need_v) {
      grad_v = ia3_task_reduce(gw, s2, vectors, tasks, /*divide=*/false, need_x ? &gw : nullptr).to(vectors.scalar_type());
    } else {
      ia3_scale_into(gw, gw, vectors, tasks);
    }
    if (need_x) grad_x = gw.view(x_shape);
    return {grad_x, grad_v};
  }
  // y = (x W^T + b) * l: grad_l = sum(g * y) / l, grad_x = (g * l) W.
  const bool fold = W.is_4bit() && tasks.single();
  at::Tensor gs;
  if (need_x && !fold) gs = at::empty_like(g2);
  if (need_v) {
    grad_v = ia3_task_reduce(g2, s2, vectors, tasks, /*divide=*/true, gs.defined() ? &gs : nullptr)
                 .to(vectors.scalar_type());
  } else if (gs.defined()) {
    ia3_scale_into(g2, gs, vectors, tasks);
  }
  if (need_x) {
    grad_x = fold ? at::mm(g2, materialize_scaled(W, saved, vectors, /*dim=*/0)) : at::mm(gs, materialize(W, saved));
    grad_x = grad_x.view(x_shape);
  }
  return {grad_x, grad_v};
}

// ---- op entry points ----------------------------------------------------------------------------

at::Tensor ia3_linear(const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
                      at::IntArrayRef weight_ints, const c10::optional<at::Tensor>& bias, const at::Tensor& vectors,
                      const c10::optional<at::Tensor>& task_ids, bool is_feedforward) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  const auto W = parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  return ia3_forward(x, W, bias, vectors, task_ids, is_feedforward);
}

std::tuple<at::Tensor, at::Tensor> ia3_linear_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                                                       c10::string_view weight_format,
                                                       const OptTensorList& weight_tensors,
                                                       at::IntArrayRef weight_ints, const at::Tensor& vectors,
                                                       const c10::optional<at::Tensor>& task_ids, bool is_feedforward,
                                                       const c10::List<bool>& output_mask) {
  check_float(saved, kOp, "saved");
  // saved is y [..., O] on the output side, so K comes from the weight.
  const auto W = parse_frozen_weight(weight_format, weight_tensors, weight_ints, saved, -1, kOp);
  return ia3_backward(grad_out, saved, W, vectors, task_ids, is_feedforward, output_mask);
}

}  // namespace

// One device-generic body: GEMMs in ATen, scaling, reductions and dequantization through the
// dispatcher to each device's kernels.
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("ia3_linear", &ia3_linear);
  m.impl("ia3_linear_backward", &ia3_linear_backward);
}

}  // namespace fastpeft
