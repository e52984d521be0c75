// Autograd for prefix_attention, in C++.
//
// As for LoRA and (IA)^3 (csrc/lora/lora_autograd.cpp, csrc/ia3/ia3_autograd.cpp):
// torch.library.register_autograd runs Python on every call (~0.1 ms forward, ~0.2 ms backward),
// which at decode and small-batch sizes is more than the attention kernels take. This kernel sits at
// the Autograd dispatch key and calls the device op below it; the fake kernels stay in Python
// (fastpeft/ops/prefix_attention.py) for torch.compile.
//
// Saved for backward: q, k, v, the prefix bank, out, the fp32 log-sum-exp, and
// prefix_index / attention_mask when given. The log-sum-exp output is not differentiable.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// Autograd-function inputs are ordered (q, k, v, prefix_k, prefix_v, prefix_index, attention_mask,
// causal, scale), so needs_input_grad(0..4) are always the five differentiable inputs.
struct PrefixAttentionFunction : public torch::autograd::Function<PrefixAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& prefix_k, const at::Tensor& prefix_v, const OptTensor& prefix_index,
                               const OptTensor& attention_mask, bool causal, c10::optional<double> scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::prefix_attention", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const OptTensor&, const OptTensor&, bool, c10::optional<double>)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, causal, scale);
    ctx->save_for_backward({q, k, v, prefix_k, prefix_v, out, lse, prefix_index.value_or(at::Tensor()),
                            attention_mask.value_or(at::Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    // Undefined incoming gradients are handled in backward (no zeros for the lse's gradient).
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::prefix_attention_backward", "")
                         .typed<Grads5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                       const at::Tensor&, const at::Tensor&, bool, c10::optional<double>,
                                       const c10::List<bool>&)>();
    variable_list result(9);
    bool need[5];
    bool any = false;
    for (size_t i = 0; i < 5; ++i) any |= (need[i] = ctx->needs_input_grad(i));
    if (!any) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[5];
    // The output no loss reached: zeros, as a Python autograd function would have materialized.
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const auto scale_iv = ctx->saved_data["scale"];
    const c10::optional<double> scale = scale_iv.isNone() ? c10::nullopt : c10::optional<double>(scale_iv.toDouble());
    auto [gq, gk, gv, gpk, gpv] =
        op.call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], optional_of(saved[7]),
                optional_of(saved[8]), out, saved[6], ctx->saved_data["causal"].toBool(), scale,
                c10::List<bool>({need[0], need[1], need[2], need[3], need[4]}));
    const at::Tensor g[5] = {gq, gk, gv, gpk, gpv};
    for (size_t i = 0; i < 5; ++i) result[i] = need[i] ? g[i] : at::Tensor();
    return result;  // prefix_index, attention_mask, causal, scale: none
  }
};

std::tuple<at::Tensor, at::Tensor> prefix_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& prefix_k,
                                                             const at::Tensor& prefix_v, const OptTensor& prefix_index,
                                                             const OptTensor& attention_mask, bool causal,
                                                             c10::optional<double> scale) {
  auto outs = PrefixAttentionFunction::apply(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, causal, scale);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("prefix_attention", &prefix_attention_autograd); }

}  // namespace fastpeft
