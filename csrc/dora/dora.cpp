// DoRA (weight-decomposed LoRA, peft's use_dora=True) on one projection, forward and backward, over
// any frozen-weight format (common/frozen_weights.h).
//
// peft computes, with the per-row norm n = ||W + s B A||_2 (detached) and x_d = dropout(x),
//   out = base(x) + (m / n - 1) * (x_d W^T) + (m / n) * s * (x_d A^T) B^T.
//
// How this op computes it (GEMMs in ATen's vendor kernels, nothing of size out x in but the
// dequantization workspace):
//  - n^2 = ||W_r||^2 + 2 s <W_r, (B A)_r> + s^2 ||(B A)_r||^2. ||W_r||^2 belongs to the frozen weight:
//    the layer caches it (weight_sq_norm). The cross term needs A W^T [r, O], and that comes out of
//    the base GEMM itself: A is stacked under x, so W (dequantized into the workspace once) is read
//    by one GEMM for both. The last term is the diagonal of B (A A^T) B^T, r x r work. peft instead
//    forms B A and W + s B A, two more [out, in] tensors, every step.
//  - without dropout the base product is reused (peft #2107): y = x W^T + s (x A^T) B^T and
//    out = (m / n) y + b, one base GEMM as for LoRA. With dropout the math needs x_d W^T besides
//    x W^T, two base GEMMs as in peft; x_d is a transient buffer made from the seed, never saved.
//  - saved for backward: x, y [M, O], the shrink [M, r] and n [O]; never W or a dropout mask.
//    (peft's autograd keeps two [M, O] products and the [out, in] weight sum.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "common/checks.h"
#include "common/dropout_seed.h"
#include "common/frozen_weights.h"
#include "lora/lora.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.dora_linear";
constexpr const char* kBackwardOp = "fastpeft.dora_linear_backward";

struct DoraShapes {
  int64_t M = 0, K = 0, O = 0, r = 0;
};

DoraShapes check_dora_args(const at::Tensor& x, const FrozenWeight& W, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& magnitude, const char* op) {
  check_dim(A, 2, op, "lora_A");
  check_dim(B, 2, op, "lora_B");
  check_dtype(A, x.scalar_type(), op, "lora_A", " (the dtype of x; cast the adapter to the compute dtype)");
  check_dtype(B, x.scalar_type(), op, "lora_B", " (the dtype of x; cast the adapter to the compute dtype)");
  check_same_device(A, x, op, "lora_A", "x");
  check_same_device(B, x, op, "lora_B", "x");
  check_float(magnitude, op, "magnitude");
  check_same_device(magnitude, x, op, "magnitude", "x");
  DoraShapes s;
  s.K = x.size(-1);
  s.M = s.K == 0 ? x.numel() : x.numel() / s.K;
  s.O = W.out_features;
  s.r = A.size(0);
  TORCH_CHECK(s.r >= 1, op, ": rank r of lora_A must be >= 1, got ", s.r);
  TORCH_CHECK(A.size(1) == s.K, op, ": lora_A must be [r, ", s.K, "] (x has ", s.K, " features), got ", A.sizes());
  TORCH_CHECK(B.size(0) == s.O && B.size(1) == s.r, op, ": lora_B must be [", s.O, ", ", s.r,
              "] (out_features x r), got ", B.sizes());
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == s.O, op, ": magnitude must be [", s.O,
              "] (one entry per output feature), got ", magnitude.sizes());
  return s;
}

at::Tensor call_dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dropout_apply", "")
                       .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
  return op.call(x, p, seed);
}

void call_dropout_apply_add(at::Tensor& out, const at::Tensor& x, double p, const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dropout_apply_add_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  op.call(out, x, p, seed);
}

// n = ||W + s B A||_2 per output row, float32, from ||W_r||^2, A W^T [r, O] and the factors.
at::Tensor dora_weight_norm(const at::Tensor& w_sq, const at::Tensor& aw, const at::Tensor& A, const at::Tensor& B,
                            double s) {
  const auto Af = A.to(at::kFloat), Bf = B.to(at::kFloat);
  const auto cross = (Bf * aw.t().to(at::kFloat)).sum(1);      // <W_r, (B A)_r>
  const auto ba_sq = (at::mm(Bf, at::mm(Af, Af.t())) * Bf).sum(1);  // ||(B A)_r||^2
  return (w_sq + cross.mul(2.0 * s) + ba_sq.mul(s * s)).clamp_min_(0.0).sqrt_();
}

at::Tensor weight_sq_norm_of(const at::Tensor& w, const c10::optional<at::Tensor>& given, int64_t O) {
  if (given.has_value() && given->defined()) {
    TORCH_CHECK(given->scalar_type() == at::kFloat && given->dim() == 1 && given->size(0) == O, kOp,
                ": weight_sq_norm must be a float32 [", O, "] tensor (||W_row||^2), got ", given->scalar_type(), " ",
                given->sizes());
    TORCH_CHECK(given->device() == w.device(), kOp, ": weight_sq_norm is on ", given->device(), " but x is on ",
                w.device());
    return *given;
  }
  return at::linalg_vector_norm(w, 2, {1}, false, at::kFloat).square_();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear(
    const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
    at::IntArrayRef weight_ints, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& weight_sq_norm) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  const auto W = parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  const auto sh = check_dora_args(x, W, lora_A, lora_B, magnitude, kOp);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dtype(*bias, x.scalar_type(), kOp, "bias", " (the dtype of x)");
    check_same_device(*bias, x, kOp, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == sh.O, kOp, ": bias must be [", sh.O, "], got ", bias->sizes());
  }
  const auto dropout_seed = seed_if_dropout(dropout_p, seed, kOp);
  const auto x2 = x.reshape({sh.M, sh.K}).contiguous();
  const auto A = lora_A.contiguous();
  const auto x_d = dropout_seed ? call_dropout_apply(x2, dropout_p, *dropout_seed) : x2;

  const auto w = W.materialize(x.scalar_type(), x.device());
  // One GEMM reads W for the (dropped) base product and for A W^T, the norm's cross term.
  const auto both = at::mm(at::cat({x_d, A}, 0), w.t());  // [M + r, O]
  auto y = both.narrow(0, 0, sh.M);
  const auto aw = both.narrow(0, sh.M, sh.r);
  const auto norm = dora_weight_norm(weight_sq_norm_of(w, weight_sq_norm, sh.O), aw, A, lora_B, scaling);
  const auto shrink = at::mm(x_d, A.t());
  const auto scale_minus_1 = (magnitude.to(at::kFloat) / norm).sub_(1.0).to(x.scalar_type());

  at::Tensor out;
  if (dropout_seed) {
    // out = x W^T + b + s (x_d A^T) B^T + (m/n - 1) y, with y = x_d W^T + s (x_d A^T) B^T.
    out = has_bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    out.addmm_(shrink, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
    y.addmm_(shrink, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
    out.addcmul_(y, scale_minus_1);
  } else {
    // out = (m/n) y + b = y + b + (m/n - 1) y: the small factor (m/n - 1) keeps its bits in 16-bit dtypes.
    y.addmm_(shrink, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
    out = at::addcmul(y, y, scale_minus_1);  // one pass over [M, O]
    if (has_bias) out.add_(*bias);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.O;
  return {out.view(out_shape), y, shrink, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y, const at::Tensor& shrink,
    const at::Tensor& weight_norm, c10::string_view weight_format, const OptTensorList& weight_tensors,
    at::IntArrayRef weight_ints, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
    double scaling, double dropout_p, const c10::optional<at::Tensor>& seed, const c10::List<bool>& output_mask) {
  check_float(x, kBackwardOp, "x");
  TORCH_CHECK(x.dim() >= 1, kBackwardOp, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(output_mask.size() == 3, kBackwardOp, ": output_mask must have 3 entries, got ", output_mask.size());
  const auto W = parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kBackwardOp);
  const auto sh = check_dora_args(x, W, lora_A, lora_B, magnitude, kBackwardOp);
  const auto dropout_seed = seed_if_dropout(dropout_p, seed, kBackwardOp);
  check_dtype(grad_out, x.scalar_type(), kBackwardOp, "grad_out", " (the dtype of x)");
  TORCH_CHECK(grad_out.numel() == sh.M * sh.O, kBackwardOp, ": grad_out must be [..., ", sh.O, "] with ", sh.M,
              " rows, got ", grad_out.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == sh.M && y.size(1) == sh.O, kBackwardOp, ": y must be [", sh.M, ", ",
              sh.O, "], got ", y.sizes());
  TORCH_CHECK(shrink.dim() == 2 && shrink.size(0) == sh.M && shrink.size(1) == sh.r, kBackwardOp,
              ": shrink must be [", sh.M, ", ", sh.r, "], got ", shrink.sizes());
  TORCH_CHECK(weight_norm.scalar_type() == at::kFloat && weight_norm.dim() == 1 && weight_norm.size(0) == sh.O,
              kBackwardOp, ": weight_norm must be float32 [", sh.O, "], got ", weight_norm.scalar_type(), " ",
              weight_norm.sizes());
  const bool need_x = output_mask[0], need_adapter = output_mask[1], need_b = output_mask[2];
  const auto dtype = x.scalar_type();
  const auto g = grad_out.reshape({sh.M, sh.O}).contiguous();
  const auto x2 = x.reshape({sh.M, sh.K}).contiguous();
  const auto scale = magnitude.to(at::kFloat) / weight_norm;  // m / n, float32 [O]
  const auto g_lora = g * scale.to(dtype);                    // gradient reaching the LoRA product

  at::Tensor grad_x, grad_A, grad_B, grad_m, grad_b;
  at::Tensor grad_shrink;
  if (need_x || need_adapter) grad_shrink = at::mm(g_lora, lora_B).mul_(scaling);
  if (need_adapter) {
    grad_B = at::mm(g_lora.t(), shrink).mul_(scaling);
    grad_A = dropout_seed ? lora_grad_A_dropout_call(grad_shrink, x2, dropout_p, *dropout_seed) : at::mm(grad_shrink.t(), x2);
    // d out / d m = y / n (n is detached, as in peft): a float32 column reduction.
    grad_m = at::sum(g * y, {0}, false, at::kFloat).div_(weight_norm).to(magnitude.scalar_type());
  }
  if (need_x) {
    const auto w = W.materialize(dtype, x.device());
    if (dropout_seed) {
      // x W^T feeds out directly; x_d enters through (m/n - 1) x_d W^T and the LoRA branch.
      auto dropped_grad = at::mm(g * scale.sub(1.0).to(dtype), w);
      dropped_grad.addmm_(grad_shrink, lora_A);
      grad_x = at::mm(g, w);
      call_dropout_apply_add(grad_x, dropped_grad, dropout_p, *dropout_seed);
    } else {
      grad_x = at::mm(g_lora, w);
      grad_x.addmm_(grad_shrink, lora_A);
    }
    grad_x = grad_x.view(x.sizes());
  }
  if (need_b) grad_b = g.sum(0);
  auto empty = [&] { return at::empty({0}, x.options()); };
  return {need_x ? grad_x : empty(), need_adapter ? grad_A : empty(), need_adapter ? grad_B : empty(),
          need_adapter ? grad_m : empty(), need_b ? grad_b : empty()};
}

}  // namespace

// One device-generic body: GEMMs in ATen, dequantization and dropout through the dispatcher.
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("dora_linear", &dora_linear);
  m.impl("dora_linear_backward", &dora_linear_backward);
}

}  // namespace fastpeft
