// Autograd for dora_linear, in C++ (as csrc/lora/lora_autograd.cpp, and for the same reason: a
// Python autograd wrapper costs more per call than a layer's kernels on a GPU).
//
// Saved for backward: x, y [M, O], the shrink [M, r], the float32 norm [O], the adapter tensors;
// the frozen weight by reference (a quantized weight as the quantized tensors it is), never a
// dequantized weight or a dropout mask. The base weight and bias of a DoRA layer are frozen.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_args.h"

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
  // Inputs in this order so that needs_input_grad(0..3) are always x, lora_A, lora_B, magnitude and
  // (4) the bias when there is one: absent optional tensors do not count as inputs.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& magnitude, const OptTensor& bias,
                               const FrozenWeightArg& weight, const OptTensor& weight_sq_norm, double scaling,
                               double dropout_p, const OptTensor& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::dora_linear", "")
                         .typed<ForwardResult(const at::Tensor&, c10::string_view, const OptTensorList&,
                                              at::IntArrayRef, const OptTensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, double, double, const OptTensor&,
                                              const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, y, shrink, norm] = op.call(x, weight.format, weight.tensors, weight.ints, bias, lora_A, lora_B,
                                          magnitude, scaling, dropout_p, seed, weight_sq_norm);
    const bool has_seed = seed.has_value() && seed->defined();
    ctx->save_for_backward({x, y, shrink, norm, lora_A, lora_B, magnitude, has_seed ? *seed : at::Tensor()});
    weight.save_by_reference(ctx);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({y, shrink, norm});
    return {out, y, shrink, norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::dora_linear_backward", "")
                         .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, c10::string_view,
                                               const OptTensorList&, at::IntArrayRef, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double, double, const OptTensor&,
                                               const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1], &shrink = saved[2], &norm = saved[3];
    const at::Tensor &lora_A = saved[4], &lora_B = saved[5], &magnitude = saved[6];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_adapter = ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
    const bool need_b = has_bias && ctx->needs_input_grad(4);
    variable_list result(10);  // one slot per forward argument
    if (!need_x && !need_adapter && !need_b) return result;
    const auto weight = FrozenWeightArg::load_by_reference(ctx);
    auto [gx, gA, gB, gm, gb] =
        op.call(grad_or_zeros(grads[0], x, lora_B.size(0)), x, y, shrink, norm, weight.format, weight.tensors,
                weight.ints, lora_A, lora_B, magnitude, ctx->saved_data["scaling"].toDouble(),
                ctx->saved_data["dropout_p"].toDouble(), optional_of(saved[7]),
                c10::List<bool>({need_x, need_adapter, need_b}));
    if (need_x) result[0] = gx;
    if (need_adapter) {
      result[1] = gA;
      result[2] = gB;
      result[3] = gm;
    }
    if (need_b) result[4] = gb;
    return result;
  }
};

ForwardResult dora_linear_autograd(const at::Tensor& x, c10::string_view weight_format,
                                   const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                                   const OptTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   const at::Tensor& magnitude, double scaling, double dropout_p, const OptTensor& seed,
                                   const OptTensor& weight_sq_norm) {
  const auto weight = FrozenWeightArg::of(weight_format, weight_tensors, weight_ints);
  weight.check_frozen("fastpeft.dora_linear");
  auto r = DoraLinearFunction::apply(x, lora_A, lora_B, magnitude, bias, weight, weight_sq_norm, scaling, dropout_p,
                                     seed);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("dora_linear", &dora_linear_autograd); }

}  // namespace fastpeft
