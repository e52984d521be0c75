// Autograd for multi_lora_linear, in C++.
//
// As for LoRA (csrc/lora/lora_autograd.cpp): torch.library.register_autograd runs Python on every
// call, and for ops with tensor-list arguments (the adapter bank) that is pytree packing of every
// adapter, forward and backward, per layer: more than a multi-LoRA layer's kernels take at small
// and medium sizes. This kernel sits at the Autograd dispatch key and calls the device-generic op
// below it; the fake kernels stay in Python (fastpeft/ops/multi_lora.py) for torch.compile.
//
// Saved for backward: x, the [M, r_max] shrink output, the plan (sorted_rows, offsets), the
// adapters, with dropout the seed, and the frozen weight as FrozenWeightArg keeps it (a dense
// weight as an input, it may be trainable; a quantized one by reference, never dequantized).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_args.h"

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor>;

// Autograd-function inputs are ordered so that the tensors whose gradients matter have fixed
// indices: x, the dense weight (none when quantized), lora_A[n], lora_B[n], sorted_rows, offsets,
// then the optional bias and seed (an absent optional tensor is no autograd input), then the
// non-tensor arguments (the frozen weight, scalings, dropout_p).
//
// Saved variables: x, shrink, sorted_rows, offsets, lora_A[n], lora_B[n], seed (undefined when
// absent), the dense weight.

struct Needs {
  bool x = false, weight = false, bias = false;
  std::vector<bool> A, B;
  bool any() const {
    if (x || weight || bias) return true;
    for (size_t i = 0; i < A.size(); ++i)
      if (A[i] || B[i]) return true;
    return false;
  }
  c10::List<bool> adapter_grads() const {
    c10::List<bool> out;
    for (size_t i = 0; i < A.size(); ++i) out.push_back(A[i] || B[i]);
    return out;
  }
};

struct MultiLoraLinearFunction : public torch::autograd::Function<MultiLoraLinearFunction> {
  // Inputs, one backward slot each: x, dense weight[nw], lora_A[n], lora_B[n], sorted_rows,
  // offsets, bias, seed, the frozen weight (one value), scalings, dropout_p.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList dense_weight,
                               at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& sorted_rows,
                               const at::Tensor& offsets, const OptTensor& bias, const OptTensor& seed,
                               const FrozenWeightArg& weight, at::ArrayRef<double> scalings,
                               at::ArrayRef<double> dropout_p) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::multi_lora_linear", "")
                         .typed<ForwardResult(const at::Tensor&, c10::string_view, const OptTensorList&,
                                              at::IntArrayRef, const OptTensor&, at::TensorList, at::TensorList,
                                              at::ArrayRef<double>, at::ArrayRef<double>, const OptTensor&,
                                              const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrink] = op.call(x, weight.format, weight.op_tensors(dense_weight), weight.ints, bias, lora_A, lora_B,
                                 scalings, dropout_p, seed, sorted_rows, offsets);
    variable_list saved{x, shrink, sorted_rows, offsets};
    saved.insert(saved.end(), lora_A.begin(), lora_A.end());
    saved.insert(saved.end(), lora_B.begin(), lora_B.end());
    saved.push_back(seed.value_or(at::Tensor()));
    weight.save(ctx, dense_weight, saved);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(lora_A.size());
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["scalings"] = scalings.vec();
    ctx->saved_data["dropout_p"] = dropout_p.vec();
    ctx->mark_non_differentiable({shrink});
    // Undefined incoming gradients are handled in backward (no zeros for the shrink's gradient).
    ctx->set_materialize_grads(false);
    return {out, shrink};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::multi_lora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                                           at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                             const OptTensorList&, at::IntArrayRef, at::TensorList, at::TensorList,
                             at::ArrayRef<double>, at::ArrayRef<double>, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const c10::List<bool>&, const c10::List<bool>&)>();
    const size_t n = ctx->saved_data["n"].toInt();
    const auto v = ctx->get_saved_variables();
    const auto weight = FrozenWeightArg::load(ctx, v, 5 + 2 * n);
    const size_t nw = weight.is_dense() ? weight.tensors.size() : 0;
    // needs_input_grad: x (0), dense weight (1 ..), lora_A (1+nw ..), lora_B (1+nw+n ..), plan, bias.
    Needs need;
    need.x = ctx->needs_input_grad(0);
    need.weight = nw > 0 && ctx->needs_input_grad(1);
    const size_t a0 = 1 + nw;
    for (size_t i = 0; i < n; ++i) {
      need.A.push_back(ctx->needs_input_grad(a0 + i));
      need.B.push_back(ctx->needs_input_grad(a0 + n + i));
    }
    need.bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(a0 + 2 * n + 2);
    if (!need.any()) return variable_list(2 * n + 8 + nw);

    const at::Tensor& x = v[0];
    const std::vector<at::Tensor> A(v.begin() + 4, v.begin() + 4 + n), B(v.begin() + 4 + n, v.begin() + 4 + 2 * n);
    const int64_t out_features = B.empty() ? parse_frozen_weight(weight.format, weight.tensors, weight.ints, x, -1,
                                                                 "fastpeft.multi_lora_linear_backward")
                                                 .out_features
                                           : B[0].size(0);
    auto [gx, gA, gB, gW, gb] =
        op.call(grad_or_zeros(grads[0], x, out_features), x, v[1], weight.format, weight.tensors, weight.ints, A, B,
                ctx->saved_data["scalings"].toDoubleVector(), ctx->saved_data["dropout_p"].toDoubleVector(),
                optional_of(v[4 + 2 * n]), v[2], v[3], c10::List<bool>({need.x, need.weight, need.bias}),
                need.adapter_grads());
    variable_list result;
    result.push_back(need.x ? gx : at::Tensor());
    if (nw) result.push_back(need.weight ? gW : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(need.A[i] ? gA[i] : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(need.B[i] ? gB[i] : at::Tensor());
    result.resize(result.size() + 2);  // sorted_rows, offsets
    result.push_back(need.bias ? gb : at::Tensor());
    result.resize(result.size() + 4);  // seed, the frozen weight, scalings, dropout_p
    return result;
  }
};

ForwardResult multi_lora_linear_autograd(const at::Tensor& x, c10::string_view weight_format,
                                         const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                                         const OptTensor& bias, at::TensorList lora_A, at::TensorList lora_B,
                                         at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
                                         const OptTensor& seed, const at::Tensor& sorted_rows,
                                         const at::Tensor& offsets) {
  auto weight = FrozenWeightArg::of(weight_format, weight_tensors, weight_ints);
  const auto dense = weight.take_dense_inputs("fastpeft.multi_lora_linear");
  auto outs = MultiLoraLinearFunction::apply(x, at::TensorList(dense), lora_A, lora_B, sorted_rows, offsets, bias, seed,
                                             weight, scalings, dropout_p);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("multi_lora_linear", &multi_lora_linear_autograd); }

}  // namespace fastpeft
