// SparseDeltaLinear's op: y = x (W + D)^T + b on a frozen W of any format (common/frozen_weights.h:
// dense, bitsandbytes 4-bit, bitsandbytes int8), with D a sparse delta (indices, values); forward
// and backward, one composite body for every device.
//
// Memory rules:
//  - W + D is written into the shared dequantization workspace (dense copy + delta, or
//    dequantization with the delta added before the one rounding to x's dtype), used by one GEMM
//    and dropped; backward writes it again. No dense delta and no dense weight gradient ever exist.
//  - dL/dD is computed at the indices only (sparse_delta_weight_grad); what backward needs of the
//    activations is x alone.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/frozen_weights.h"
#include "common/workspace.h"
#include "quant4bit/quant4bit.h"
#include "sparse_delta/sparse_delta.h"

namespace fastpeft {

// Through the dispatcher, so each runs its device's kernel (declared in sparse_delta.h).
void call_sparse_delta_add(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::sparse_delta_add_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(out, indices, values);
}

at::Tensor call_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::sparse_delta_weight_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad_out, x, indices, /*chunk_tokens=*/0);
}

namespace {

constexpr const char* kOp = "fastpeft.sparse_delta_linear";

void call_dequantize_add_delta(const Quant4bitWeight& w, const at::Tensor& indices, const at::Tensor& values,
                               at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dequantize_4bit_add_delta_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                   int64_t, c10::string_view, const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  op.call(w.packed, w.absmax, opt(w.nested_absmax), opt(w.nested_code), opt(w.nested_offset), w.blocksize,
          w.nested_blocksize, w.type == Quant4bitType::NF4 ? "nf4" : "fp4", indices, values, out);
}

// W + D as a dense [O, K] tensor of x's dtype in the shared workspace (valid until the next
// workspace request on this thread).
at::Tensor materialize(const FrozenWeight& base, const at::Tensor& indices, const at::Tensor& values32,
                       const at::Tensor& x) {
  const int64_t O = base.out_features, K = base.in_features;
  auto w = dequant_workspace(O * K, x.scalar_type(), x.device()).view({O, K});
  switch (base.format) {
    case WeightFormat::Quant4bit:
      call_dequantize_add_delta(base.quant, indices, values32, w);
      break;
    case WeightFormat::Int8:
      if (x.scalar_type() == at::kFloat) {
        dequantize_int8_rowwise_into(base.int8, w);
        call_sparse_delta_add(w, indices, values32);
      } else {
        // One rounding to x's dtype after the float32 sum, as for the other formats: the delta
        // goes onto a float32 dequantization, then the sum is cast once.
        auto w32 = at::empty({O, K}, x.options().dtype(at::kFloat));
        dequantize_int8_rowwise_into(base.int8, w32);
        call_sparse_delta_add(w32, indices, values32);
        w.copy_(w32);
      }
      break;
    case WeightFormat::Dense:
      w.copy_(base.dense);
      call_sparse_delta_add(w, indices, values32);
      break;
  }
  return w;
}

void check_x(const at::Tensor& x) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
}

std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.back() = last;
  return out;
}

at::Tensor forward(const at::Tensor& x, const FrozenWeight& base, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& indices, const at::Tensor& values) {
  const int64_t K = x.size(-1), O = base.out_features;
  const auto [idx, values32] = checked_delta(indices, values, O * K, x.device(), kOp);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dtype(*bias, x.scalar_type(), kOp, "bias", " (the dtype of x)");
    check_same_device(*bias, x, kOp, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O, kOp, ": bias must be [", O, "], got ", bias->sizes());
  }
  const auto x2 = as_rows(x);
  auto w = materialize(base, idx, values32, x);
  auto out = has_bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  return out.view(with_last(x.sizes(), O));
}

// output_mask: [x, values, bias].
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const FrozenWeight& base, const at::Tensor& indices,
                                                        const at::Tensor& values,
                                                        const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 3, kOp, "_backward: output_mask must have 3 entries, got ", output_mask.size());
  const int64_t K = x.size(-1), O = base.out_features;
  const auto [idx, values32] = checked_delta(indices, values, O * K, x.device(), kOp);
  check_dtype(grad_out, x.scalar_type(), kOp, "grad_out", " (the dtype of x)");
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(grad_out.numel() == M * O && grad_out.size(-1) == O, kOp, "_backward: grad_out must be [..., ", O,
              "] with ", M, " rows, got ", grad_out.sizes());
  const auto g = grad_out.reshape({M, O});
  at::Tensor grad_x, grad_values, grad_bias;
  if (output_mask[0]) {
    auto w = materialize(base, idx, values32, x);
    grad_x = at::mm(g, w).view(x.sizes());
  } else {
    grad_x = at::empty({0}, x.options());
  }
  grad_values = output_mask[1] ? call_weight_grad(g, x.reshape({M, K}), idx).to(values.scalar_type())
                               : at::empty({0}, values.options());
  grad_bias = output_mask[2] ? g.sum(0) : at::empty({0}, x.options());
  return {grad_x, grad_values, grad_bias};
}

// ---- op entry points ----------------------------------------------------------------------------

at::Tensor sparse_delta_linear(const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
                               at::IntArrayRef weight_ints, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& indices, const at::Tensor& values) {
  check_x(x);
  const auto base = parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  return forward(x, base, bias, indices, values);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, c10::string_view weight_format,
    const OptTensorList& weight_tensors, at::IntArrayRef weight_ints, const at::Tensor& indices,
    const at::Tensor& values, const c10::List<bool>& output_mask) {
  check_x(x);
  const auto base = parse_frozen_weight(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  return backward(grad_out, x, base, indices, values, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("sparse_delta_linear", &sparse_delta_linear);
  m.impl("sparse_delta_linear_backward", &sparse_delta_linear_backward);
}

}  // namespace fastpeft
