// Autograd for sparse_delta_linear / sparse_delta_linear_4bit, in C++.
//
// As for LoRA and (IA)^3 (csrc/lora/lora_autograd.cpp, csrc/ia3/ia3_autograd.cpp):
// torch.library.register_autograd runs Python on every call, ~0.1 ms forward and ~0.2 ms backward
// per layer, more than a small layer's kernels take. These kernels sit at the Autograd dispatch key
// and call the device ops below it; the fake kernels stay in Python (fastpeft/ops/sparse_delta.py)
// for torch.compile.
//
// Saved for backward, as before: x, indices and values; the frozen weight by reference (4-bit
// weights as the packed tensors they are), never W + D, a dense delta or a dense weight gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using GradTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Autograd-function inputs are ordered (x, values, indices, weight..., bias) so that
// needs_input_grad(0) and (1) are always x and the values, and the optional bias, which does not
// count as an input when absent, comes last.

// The gradient of the output; the output no loss reached comes as an undefined tensor: zeros.
at::Tensor grad_or_zeros(const at::Tensor& grad, const at::Tensor& x, int64_t out_features) {
  if (grad.defined()) return grad;
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return at::zeros(shape, x.options());
}

// ---- dense frozen weight ---------------------------------------------------------------------------

struct SparseDeltaLinearFunction : public torch::autograd::Function<SparseDeltaLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& indices, const at::Tensor& weight, const OptTensor& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::sparse_delta_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                           const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, weight, bias, indices, values);
    ctx->save_for_backward({x, indices, values});
    ctx->saved_data["weight"] = weight;  // frozen module state, by reference
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::sparse_delta_linear_backward", "")
                         .typed<GradTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad: x (0), values (1), indices (2), weight (3), bias (4) when given.
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(4);
    variable_list result(5);  // x, values, indices, weight, bias (a slot even when absent)
    if (!need_x && !need_v && !need_b) return result;
    const auto weight = ctx->saved_data["weight"].toTensor();
    auto [gx, gv, gb] = op.call(grad_or_zeros(grads[0], saved[0], weight.size(0)), saved[0], weight, saved[1],
                                saved[2], c10::List<bool>({need_x, need_v, need_b}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    result[4] = need_b ? gb : at::Tensor();
    return result;
  }
};

at::Tensor sparse_delta_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                        const at::Tensor& indices, const at::Tensor& values) {
  // The weight stays an autograd input (it gets no gradient, as before) but is saved by reference.
  return SparseDeltaLinearFunction::apply(x, values, indices, weight, bias);
}

// ---- bitsandbytes 4-bit frozen weight -------------------------------------------------------------

struct Quant4bitArgs {
  at::Tensor packed, absmax;
  OptTensor nested_absmax, nested_code, nested_offset;
  int64_t out_features, blocksize, nested_blocksize;
  std::string quant_type;
};

struct SparseDeltaLinear4bitFunction : public torch::autograd::Function<SparseDeltaLinear4bitFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& indices, const Quant4bitArgs& q, const OptTensor& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::sparse_delta_linear_4bit", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t,
                                           c10::string_view, const OptTensor&, const at::Tensor&,
                                           const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, q.out_features,
                       q.blocksize, q.nested_blocksize, q.quant_type, bias, indices, values);
    ctx->save_for_backward({x, indices, values});
    // The packed weight is module state, kept by reference as the packed tensors it already is.
    auto& d = ctx->saved_data;
    d["packed"] = q.packed;
    d["absmax"] = q.absmax;
    d["nested_absmax"] = q.nested_absmax;
    d["nested_code"] = q.nested_code;
    d["nested_offset"] = q.nested_offset;
    d["out_features"] = q.out_features;
    d["blocksize"] = q.blocksize;
    d["nested_blocksize"] = q.nested_blocksize;
    d["quant_type"] = q.quant_type;
    d["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::sparse_delta_linear_4bit_backward", "")
            .typed<GradTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t,
                              c10::string_view, const at::Tensor&, const at::Tensor&, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const bool has_bias = d["has_bias"].toBool();
    // needs_input_grad: x (0), values (1), indices (2), bias (3) when given.
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(3);
    variable_list result(5);  // x, values, indices, quant (one value), bias (a slot even when absent)
    if (!need_x && !need_v && !need_b) return result;
    const int64_t out_features = d["out_features"].toInt();
    auto opt = [&](const char* key) { return d[key].isNone() ? OptTensor() : OptTensor(d[key].toTensor()); };
    auto [gx, gv, gb] =
        op.call(grad_or_zeros(grads[0], saved[0], out_features), saved[0], d["packed"].toTensor(),
                d["absmax"].toTensor(), opt("nested_absmax"), opt("nested_code"), opt("nested_offset"), out_features,
                d["blocksize"].toInt(), d["nested_blocksize"].toInt(), d["quant_type"].toStringRef(), saved[1],
                saved[2], c10::List<bool>({need_x, need_v, need_b}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    result[4] = need_b ? gb : at::Tensor();
    return result;
  }
};

at::Tensor sparse_delta_linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                             const OptTensor& nested_absmax, const OptTensor& nested_code,
                                             const OptTensor& nested_offset, int64_t out_features, int64_t blocksize,
                                             int64_t nested_blocksize, c10::string_view quant_type,
                                             const OptTensor& bias, const at::Tensor& indices,
                                             const at::Tensor& values) {
  Quant4bitArgs q{packed,       absmax,    nested_absmax,    nested_code,
                  nested_offset, out_features, blocksize, nested_blocksize, std::string(quant_type)};
  return SparseDeltaLinear4bitFunction::apply(x, values, indices, q, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("sparse_delta_linear", &sparse_delta_linear_autograd);
  m.impl("sparse_delta_linear_4bit", &sparse_delta_linear_4bit_autograd);
}

}  // namespace fastpeft
