// Autograd for sparse_delta_linear, in C++.
//
// As for LoRA and (IA)^3 (csrc/lora/lora_autograd.cpp, csrc/ia3/ia3_autograd.cpp):
// torch.library.register_autograd runs Python on every call, ~0.1 ms forward and ~0.2 ms backward
// per layer, more than a small layer's kernels take. These kernels sit at the Autograd dispatch key
// and call the device ops below it; the fake kernels stay in Python (fastpeft/ops/sparse_delta.py)
// for torch.compile.
//
// Saved for backward: x, indices and values; the frozen weight by reference (quantized weights as
// the quantized tensors they are), never W + D, a dense delta or a dense weight gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_args.h"

namespace fastpeft {
namespace {

// Autograd-function inputs are ordered (x, values, indices, weight, bias) so that
// needs_input_grad(0) and (1) are always x and the values, and the optional bias, which does not
// count as an input when absent, comes last. The frozen weight is one non-tensor value: called
// directly with a dense weight that requires grad, the op gives it no gradient (train the values).

struct SparseDeltaLinearFunction : public torch::autograd::Function<SparseDeltaLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& indices, const FrozenWeightArg& weight, const OptTensor& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::sparse_delta_linear", "")
                         .typed<at::Tensor(const at::Tensor&, c10::string_view, const OptTensorList&,
                                           at::IntArrayRef, const OptTensor&, const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, weight.format, weight.tensors, weight.ints, bias, indices, values);
    ctx->save_for_backward({x, indices, values});
    weight.save_by_reference(ctx);
    ctx->saved_data["out_features"] = out.size(-1);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::sparse_delta_linear_backward", "")
                         .typed<GradTriple(const at::Tensor&, const at::Tensor&, c10::string_view,
                                           const OptTensorList&, at::IntArrayRef, const at::Tensor&,
                                           const at::Tensor&, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad: x (0), values (1), indices (2), bias (3) when given.
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(3);
    variable_list result(5);  // x, values, indices, weight (one value), bias (a slot even when absent)
    if (!need_x && !need_v && !need_b) return result;
    const auto weight = FrozenWeightArg::load_by_reference(ctx);
    const int64_t out_features = ctx->saved_data["out_features"].toInt();
    auto [gx, gv, gb] = op.call(grad_or_zeros(grads[0], saved[0], out_features), saved[0], weight.format,
                                weight.tensors, weight.ints, saved[1], saved[2],
                                c10::List<bool>({need_x, need_v, need_b}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    result[4] = need_b ? gb : at::Tensor();
    return result;
  }
};

at::Tensor sparse_delta_linear_autograd(const at::Tensor& x, c10::string_view weight_format,
                                        const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                                        const OptTensor& bias, const at::Tensor& indices, const at::Tensor& values) {
  return SparseDeltaLinearFunction::apply(x, values, indices, FrozenWeightArg::of(weight_format, weight_tensors, weight_ints),
                                          bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("sparse_delta_linear", &sparse_delta_linear_autograd);
}

}  // namespace fastpeft
