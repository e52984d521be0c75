// Autograd for bottleneck_adapter, in C++.
//
// As for LoRA and (IA)^3 (csrc/lora/lora_autograd.cpp, csrc/ia3/ia3_autograd.cpp):
// torch.library.register_autograd runs Python on every call (pytree packing of the six tensor
// lists, setup_context), ~0.1 ms forward and ~0.2 ms backward per layer, more than an adapter's
// kernels take at small sizes. This kernel sits at the Autograd dispatch key and calls the device op
// below it; the fake kernels stay in Python (fastpeft/ops/adapter.py) for torch.compile.
//
// Saved for backward: x, the residual (only for a chain of two or more stages, where it
// is needed to recompute the second stage's input), the per-stage [M, r] pre-activations (the op's
// `saved` output), the adapter weights and biases and the rational coefficients (trainable
// parameters, saved as such). The adapter ids are int tensors kept by reference.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using OptTensorList = c10::List<c10::optional<at::Tensor>>;
using ForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, std::vector<at::Tensor>>;

struct BottleneckAdapterFunction : public torch::autograd::Function<BottleneckAdapterFunction> {
  // Inputs, flattened as autograd sees them: x, down_weight[n], down_bias[n], up_weight[n],
  // up_bias[n], ln_weight[n_ln], ln_bias[n_ln], residual (optional: a slot even when absent),
  // rational_coeffs[n_c], then the non-tensor arguments adapter_ids, scalings, activation, ln_eps.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList Wd, at::TensorList bd,
                               at::TensorList Wu, at::TensorList bu, at::TensorList ln_w, at::TensorList ln_b,
                               const OptTensor& residual, at::TensorList coeffs, const OptTensorList& ids,
                               std::vector<double> scalings, std::string activation, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::bottleneck_adapter", "")
                         .typed<ForwardResult(const at::Tensor&, const OptTensor&, at::TensorList, at::TensorList,
                                              at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                              at::TensorList, const OptTensorList&, at::ArrayRef<double>,
                                              c10::string_view, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, saved] = op.call(x, residual, Wd, bd, Wu, bu, ln_w, ln_b, coeffs, ids, scalings, activation, eps);
    // The op checked the list lengths: n stages, ln_weight and ln_bias both empty or n long,
    // rational_coeffs n long (rational) or empty.
    const size_t n = Wd.size(), n_ln = ln_w.size(), n_c = coeffs.size();
    const bool has_res = residual.has_value() && residual->defined();
    // The residual is only needed to recompute the input of a second stage.
    variable_list to_save{x, (has_res && n > 1) ? *residual : at::Tensor()};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    for (at::TensorList list : {Wd, bd, Wu, bu, ln_w, ln_b, coeffs})
      to_save.insert(to_save.end(), list.begin(), list.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    ctx->saved_data["n_ln"] = static_cast<int64_t>(n_ln);
    ctx->saved_data["n_c"] = static_cast<int64_t>(n_c);
    ctx->saved_data["has_res"] = has_res;
    ctx->saved_data["ids"] = ids;  // int tensors, never differentiable; kept as references
    ctx->saved_data["scalings"] = scalings;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable(saved);
    variable_list result{out};
    result.insert(result.end(), saved.begin(), saved.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::bottleneck_adapter_backward", "")
                         .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const OptTensor&, at::TensorList,
                                               at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                               at::TensorList, at::TensorList, at::TensorList, const OptTensorList&,
                                               at::ArrayRef<double>, c10::string_view, double,
                                               const c10::List<bool>&)>();
    auto& d = ctx->saved_data;
    const size_t n = d["n"].toInt(), n_ln = d["n_ln"].toInt(), n_c = d["n_c"].toInt();
    const bool has_res = d["has_res"].toBool();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    at::Tensor res = saved[1];
    auto slice = [&](size_t first, size_t count) {
      return std::vector<at::Tensor>(saved.begin() + first, saved.begin() + first + count);
    };
    const auto z = slice(2, n), Wd = slice(2 + n, n), bd = slice(2 + 2 * n, n), Wu = slice(2 + 3 * n, n),
               bu = slice(2 + 4 * n, n), ln_w = slice(2 + 5 * n, n_ln), ln_b = slice(2 + 5 * n + n_ln, n_ln),
               coeffs = slice(2 + 5 * n + 2 * n_ln, n_c);

    auto any_needed = [&](size_t first, size_t count) {
      for (size_t i = first; i < first + count; ++i)
        if (ctx->needs_input_grad(i)) return true;
      return false;
    };
    // needs_input_grad counts the tensor inputs only: x (0), down_weight (1 ..), down_bias
    // (1+n ..), up_weight (1+2n ..), up_bias (1+3n ..), ln_weight (1+4n ..), ln_bias
    // (1+4n+n_ln ..), the residual (1+4n+2n_ln) when given, rational_coeffs after it (an absent
    // optional is no variable, so it takes no index here; the result below still has its slot).
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_adapter = any_needed(1, 4 * n);
    const bool need_ln = any_needed(1 + 4 * n, 2 * n_ln);
    const bool need_res = has_res && ctx->needs_input_grad(1 + 4 * n + 2 * n_ln);
    const bool need_coeffs = any_needed(1 + 4 * n + 2 * n_ln + (has_res ? 1 : 0), n_c);
    // One stage adds its branch straight onto the residual: the residual's gradient is grad_out
    // itself, handed on here rather than copied by the op.
    const bool res_is_grad_out = n == 1;

    // The output no loss reached (or only the non-differentiable `saved` outputs did): zeros.
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(x);
    // One stage: the residual is never read in backward; any tensor of x's shape will do.
    if (has_res && !res.defined()) res = x;
    auto [gx, gres, gWd, gbd, gWu, gbu, glw, glb, gc] =
        op.call(grad_out, x, has_res ? OptTensor(res) : OptTensor(), z, Wd, bd, Wu, bu, ln_w, ln_b, coeffs,
                d["ids"].toOptionalTensorList(), d["scalings"].toDoubleVector(), d["activation"].toStringRef(),
                d["eps"].toDouble(),
                c10::List<bool>({need_x, need_res && !res_is_grad_out, need_adapter, need_ln, need_coeffs}));

    variable_list result;
    result.push_back(need_x ? gx : at::Tensor());
    for (const auto* g : {&gWd, &gbd, &gWu, &gbu})
      for (size_t i = 0; i < n; ++i) result.push_back(need_adapter ? (*g)[i] : at::Tensor());
    for (const auto* g : {&glw, &glb})
      for (size_t i = 0; i < n_ln; ++i) result.push_back(need_ln ? (*g)[i] : at::Tensor());
    result.push_back(need_res ? (res_is_grad_out ? grad_out : gres) : at::Tensor());  // residual (a slot even when absent)
    for (size_t i = 0; i < n_c; ++i) result.push_back(need_coeffs ? gc[i] : at::Tensor());
    result.resize(result.size() + 4);  // adapter_ids, scalings, activation, ln_eps
    return result;
  }
};

ForwardResult bottleneck_adapter_autograd(const at::Tensor& x, const OptTensor& residual, at::TensorList Wd,
                                          at::TensorList bd, at::TensorList Wu, at::TensorList bu,
                                          at::TensorList ln_w, at::TensorList ln_b, at::TensorList coeffs,
                                          const OptTensorList& ids, at::ArrayRef<double> scalings,
                                          c10::string_view activation, double eps) {
  auto result = BottleneckAdapterFunction::apply(x, Wd, bd, Wu, bu, ln_w, ln_b, residual, coeffs, ids,
                                                 scalings.vec(), std::string(activation), eps);
  return {result[0], std::vector<at::Tensor>(result.begin() + 1, result.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("bottleneck_adapter", &bottleneck_adapter_autograd); }

}  // namespace fastpeft
