// Autograd for ia3_scale / ia3_linear, in C++.
//
// As for LoRA (csrc/lora/lora_autograd.cpp): torch.library.register_autograd runs Python on every
// call, ~0.1 ms forward and ~0.2 ms backward per layer, more than an (IA)^3 layer's kernels take at
// small and medium sizes. These kernels sit at the Autograd dispatch key and call the device ops
// below it; the fake kernels stay in Python (fastpeft/ops/ia3.py) for torch.compile.
//
// Saved for backward: the output y (output side: grad of l is sum(grad * y) / l) or x
// (feed-forward, and ia3_scale), the vector bank and the task ids; the frozen weight by reference
// (quantized weights as the quantized tensors they are), never a dequantized weight.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_args.h"

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using GradPair = std::tuple<at::Tensor, at::Tensor>;

// Autograd-function inputs are ordered (x, vectors, ...) so that needs_input_grad(0) and (1) are
// always x and the vectors: absent optional tensors do not count as inputs.

void check_frozen(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!t.defined() || !t.requires_grad(), op, ": the base ", name,
              " is frozen and gets no gradient; call .requires_grad_(False) on it (or detach it) first");
}

// ---- ia3_scale ---------------------------------------------------------------------------------------

struct Ia3ScaleFunction : public torch::autograd::Function<Ia3ScaleFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vectors,
                            const OptTensor& task_ids) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_scale", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, vectors, task_ids);
    ctx->save_for_backward({x, vectors, task_ids.value_or(at::Tensor())});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_scale_backward", "")
                         .typed<GradPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         bool, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    if (!need_x && !need_v) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [gx, gv] = op.call(grad_or_zeros(grads[0], saved[0], saved[0].size(-1)), saved[0], saved[1], optional_of(saved[2]),
                            /*divide_by_vectors=*/false, c10::List<bool>({need_x, need_v}));
    return {need_x ? gx : at::Tensor(), need_v ? gv : at::Tensor(), at::Tensor()};
  }
};

at::Tensor ia3_scale_autograd(const at::Tensor& x, const at::Tensor& vectors, const OptTensor& task_ids) {
  return Ia3ScaleFunction::apply(x, vectors, task_ids);
}

// ---- ia3_linear (frozen weight of any format) ------------------------------------------------------

struct Ia3LinearFunction : public torch::autograd::Function<Ia3LinearFunction> {
  // Inputs: x, vectors, the frozen weight (one value), bias, task_ids, is_feedforward.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vectors,
                            const FrozenWeightArg& weight, const OptTensor& bias, const OptTensor& task_ids,
                            bool is_feedforward) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_linear", "")
                         .typed<at::Tensor(const at::Tensor&, c10::string_view, const OptTensorList&,
                                           at::IntArrayRef, const OptTensor&, const at::Tensor&, const OptTensor&,
                                           bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, weight.format, weight.tensors, weight.ints, bias, vectors, task_ids, is_feedforward);
    // Output side keeps the output itself (which the caller holds anyway), feed-forward keeps x.
    ctx->save_for_backward({is_feedforward ? x : out, vectors, task_ids.value_or(at::Tensor())});
    weight.save_by_reference(ctx);
    ctx->saved_data["is_feedforward"] = is_feedforward;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_linear_backward", "")
                         .typed<GradPair(const at::Tensor&, const at::Tensor&, c10::string_view,
                                         const OptTensorList&, at::IntArrayRef, const at::Tensor&, const OptTensor&,
                                         bool, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    variable_list result(6);
    if (!need_x && !need_v) return result;
    const bool is_feedforward = ctx->saved_data["is_feedforward"].toBool();
    const auto weight = FrozenWeightArg::load_by_reference(ctx);
    // The output side saved y [..., O]: its gradient has y's shape.
    at::Tensor grad = grads[0];
    if (!grad.defined()) {
      const auto W = parse_frozen_weight(weight.format, weight.tensors, weight.ints, saved[0], -1,
                                         "fastpeft.ia3_linear_backward");
      grad = grad_or_zeros(grad, saved[0], W.out_features);
    }
    auto [gx, gv] = op.call(grad, saved[0], weight.format, weight.tensors, weight.ints, saved[1],
                            optional_of(saved[2]), is_feedforward, c10::List<bool>({need_x, need_v}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    return result;
  }
};

at::Tensor ia3_linear_autograd(const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
                               at::IntArrayRef weight_ints, const OptTensor& bias, const at::Tensor& vectors,
                               const OptTensor& task_ids, bool is_feedforward) {
  const auto weight = FrozenWeightArg::of(weight_format, weight_tensors, weight_ints);
  weight.check_frozen("fastpeft.ia3_linear");
  check_frozen(bias.value_or(at::Tensor()), "fastpeft.ia3_linear", "bias");
  return Ia3LinearFunction::apply(x, vectors, weight, bias, task_ids, is_feedforward);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("ia3_scale", &ia3_scale_autograd);
  m.impl("ia3_linear", &ia3_linear_autograd);
}

}  // namespace fastpeft
