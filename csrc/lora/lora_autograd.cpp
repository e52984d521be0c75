// Autograd for lora_linear, in C++.
//
// torch.library.register_autograd would run Python on every call: for ops with tensor-list
// arguments that is ~0.3 ms of pytree packing per layer, more than the kernels of a LoRA layer take
// on a GPU at 2k tokens. This kernel sits at the Autograd dispatch key and calls the device-generic
// op below it; the fake (meta) kernels stay in Python (fastpeft/ops/lora.py) for torch.compile,
// which traces through the forward and backward ops.
//
// Saved for backward: x, the [M, sum r] shrink output, the adapters, and the frozen weights as
// FrozenWeightArg keeps them (dense weights as inputs, quantized ones by reference as the
// quantized tensors they are); never a dequantized weight or a dropout mask.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_args.h"

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ForwardResult = std::tuple<std::vector<at::Tensor>, at::Tensor>;

c10::List<bool> to_bool_list(const std::vector<bool>& flags) {
  c10::List<bool> out;
  for (bool f : flags) out.push_back(f);
  return out;
}

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  // Inputs, flattened as autograd sees them: x, the dense weights[nw] (none when quantized), the
  // frozen weight (one value), the biases present[nb], bias flags, lora_A[n], lora_B[n], scalings,
  // dropout_p, seed.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList dense_weights,
                               const FrozenWeightArg& weight, at::TensorList biases, std::vector<bool> has_bias,
                               at::TensorList lora_A, at::TensorList lora_B, std::vector<double> scalings,
                               double dropout_p, const c10::optional<at::Tensor>& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::lora_linear", "")
                         .typed<ForwardResult(const at::Tensor&, c10::string_view, const OptTensorList&,
                                              at::IntArrayRef, const OptTensorList&, at::TensorList, at::TensorList,
                                              at::ArrayRef<double>, double, const c10::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [outs, shrink] = op.call(x, weight.format, weight.op_tensors(dense_weights), weight.ints,
                                  SplitBiases::join(biases, has_bias), lora_A, lora_B, scalings, dropout_p, seed);
    variable_list saved{x, shrink};
    saved.insert(saved.end(), lora_A.begin(), lora_A.end());
    saved.insert(saved.end(), lora_B.begin(), lora_B.end());
    const bool has_seed = seed.has_value() && seed->defined();
    if (has_seed) saved.push_back(*seed);
    weight.save(ctx, dense_weights, saved);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(lora_A.size());
    ctx->saved_data["has_bias"] = to_bool_list(has_bias);
    ctx->saved_data["scalings"] = scalings;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_seed"] = has_seed;
    ctx->mark_non_differentiable({shrink});
    variable_list result(outs.begin(), outs.end());
    result.push_back(shrink);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::lora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                           std::vector<at::Tensor>, std::vector<at::Tensor>>(
                             at::TensorList, const at::Tensor&, const at::Tensor&, c10::string_view,
                             const OptTensorList&, at::IntArrayRef, at::TensorList, at::TensorList,
                             at::ArrayRef<double>, double, const c10::optional<at::Tensor>&, const c10::List<bool>&)>();
    const size_t n = ctx->saved_data["n"].toInt();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& shrink = saved[1];
    std::vector<at::Tensor> lora_A(saved.begin() + 2, saved.begin() + 2 + n);
    std::vector<at::Tensor> lora_B(saved.begin() + 2 + n, saved.begin() + 2 + 2 * n);
    size_t next = 2 + 2 * n;
    c10::optional<at::Tensor> seed;
    if (ctx->saved_data["has_seed"].toBool()) seed = saved[next++];
    const auto weight = FrozenWeightArg::load(ctx, saved, next);
    const size_t nw = weight.is_dense() ? weight.tensors.size() : 0;

    const auto has_bias = ctx->saved_data["has_bias"].toBoolList();
    size_t nb = 0;
    for (bool h : has_bias) nb += h;
    auto any_needed = [&](size_t first, size_t count) {
      for (size_t i = first; i < first + count; ++i)
        if (ctx->needs_input_grad(i)) return true;
      return false;
    };
    // needs_input_grad counts the tensor inputs only: x (0), dense weights (1 ..), biases present
    // (1+nw ..), lora_A (1+nw+nb ..), lora_B (1+nw+nb+n ..). The returned list has a slot per argument.
    const size_t a0 = 1 + nw + nb;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = any_needed(1, nw), need_b = any_needed(1 + nw, nb);
    const bool need_lora = any_needed(a0, n) || any_needed(a0 + n, n);

    std::vector<at::Tensor> grad_outs;
    for (size_t i = 0; i < n; ++i) grad_outs.push_back(grad_or_zeros(grads[i], x, lora_B[i].size(0)));
    const c10::List<bool> mask({need_x, need_lora, need_w, need_b});
    auto [gx, gA, gB, gW, gb] = op.call(grad_outs, x, shrink, weight.format, weight.tensors, weight.ints, lora_A,
                                        lora_B, ctx->saved_data["scalings"].toDoubleVector(),
                                        ctx->saved_data["dropout_p"].toDouble(), seed, mask);
    variable_list result;
    result.push_back(need_x ? gx : at::Tensor());
    for (size_t i = 0; i < nw; ++i) result.push_back(need_w ? gW[i] : at::Tensor());
    result.emplace_back();  // the frozen weight
    for (size_t i = 0; i < n; ++i)
      if (has_bias[i]) result.push_back(need_b ? gb[i] : at::Tensor());
    result.emplace_back();  // bias flags
    for (size_t i = 0; i < n; ++i) result.push_back(need_lora ? gA[i] : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(need_lora ? gB[i] : at::Tensor());
    result.resize(result.size() + 3);  // scalings, dropout_p, seed
    return result;
  }
};

ForwardResult lora_linear_autograd(const at::Tensor& x, c10::string_view weight_format,
                                   const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                                   const OptTensorList& biases, at::TensorList lora_A, at::TensorList lora_B,
                                   at::ArrayRef<double> scalings, double dropout_p,
                                   const c10::optional<at::Tensor>& seed) {
  auto weight = FrozenWeightArg::of(weight_format, weight_tensors, weight_ints);
  const auto dense = weight.take_dense_inputs("fastpeft.lora_linear");
  const auto b = SplitBiases::of(biases);
  auto result = LoraLinearFunction::apply(x, at::TensorList(dense), weight, at::TensorList(b.present), b.has, lora_A,
                                          lora_B, scalings.vec(), dropout_p, seed);
  return {std::vector<at::Tensor>(result.begin(), result.end() - 1), result.back()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

}  // namespace fastpeft
