// Autograd for ia3_scale / ia3_linear / ia3_linear_4bit, in C++.
//
// As for LoRA (csrc/lora/lora_autograd.cpp): torch.library.register_autograd runs Python on every
// call, ~0.1 ms forward and ~0.2 ms backward per layer, more than an (IA)^3 layer's kernels take at
// small and medium sizes. These kernels sit at the Autograd dispatch key and call the device ops
// below it; the fake kernels stay in Python (fastpeft/ops/ia3.py) for torch.compile.
//
// Saved for backward, as before: the output y (output side: grad of l is sum(grad * y) / l) or x
// (feed-forward, and ia3_scale), the vector bank and the task ids; the frozen weight by reference
// (4-bit weights as the packed tensors they are), never a dequantized weight.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using GradPair = std::tuple<at::Tensor, at::Tensor>;

// Autograd-function inputs are ordered (x, vectors, ...) so that needs_input_grad(0) and (1) are
// always x and the vectors: absent optional tensors do not count as inputs.

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

at::Tensor grad_or_zeros(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

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
    auto [gx, gv] = op.call(grad_or_zeros(grads[0], saved[0]), saved[0], saved[1], optional_of(saved[2]),
                            /*divide_by_vectors=*/false, c10::List<bool>({need_x, need_v}));
    return {need_x ? gx : at::Tensor(), need_v ? gv : at::Tensor(), at::Tensor()};
  }
};

at::Tensor ia3_scale_autograd(const at::Tensor& x, const at::Tensor& vectors, const OptTensor& task_ids) {
  return Ia3ScaleFunction::apply(x, vectors, task_ids);
}

// ---- ia3_linear (dense frozen weight) ------------------------------------------------------------

struct Ia3LinearFunction : public torch::autograd::Function<Ia3LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vectors,
                            const at::Tensor& weight, const OptTensor& bias, const OptTensor& task_ids,
                            bool is_feedforward) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                           const OptTensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, weight, bias, vectors, task_ids, is_feedforward);
    // Output side keeps the output itself (which the caller holds anyway), feed-forward keeps x.
    ctx->save_for_backward({is_feedforward ? x : out, vectors, task_ids.value_or(at::Tensor())});
    ctx->saved_data["weight"] = weight;  // frozen module state, by reference
    ctx->saved_data["is_feedforward"] = is_feedforward;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_linear_backward", "")
                         .typed<GradPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, bool, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    variable_list result(6);
    if (!need_x && !need_v) return result;
    const bool is_feedforward = ctx->saved_data["is_feedforward"].toBool();
    const auto weight = ctx->saved_data["weight"].toTensor();
    at::Tensor grad = grads[0];
    if (!grad.defined()) {  // the output no loss reached: y is x's shape with weight's rows last
      auto shape = saved[0].sizes().vec();
      shape.back() = weight.size(0);
      grad = at::zeros(shape, saved[0].options());
    }
    auto [gx, gv] = op.call(grad, saved[0], weight, saved[1], optional_of(saved[2]), is_feedforward,
                            c10::List<bool>({need_x, need_v}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    return result;
  }
};

at::Tensor ia3_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                               const at::Tensor& vectors, const OptTensor& task_ids, bool is_feedforward) {
  check_frozen(weight, "fastpeft.ia3_linear", "weight");
  check_frozen(bias.value_or(at::Tensor()), "fastpeft.ia3_linear", "bias");
  return Ia3LinearFunction::apply(x, vectors, weight, bias, task_ids, is_feedforward);
}

// ---- ia3_linear_4bit (bitsandbytes 4-bit frozen weight) -------------------------------------------

struct Quant4bitArgs {
  at::Tensor packed, absmax;
  OptTensor nested_absmax, nested_code, nested_offset;
  int64_t out_features, blocksize, nested_blocksize;
  std::string quant_type;
};

struct Ia3Linear4bitFunction : public torch::autograd::Function<Ia3Linear4bitFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vectors,
                            const Quant4bitArgs& q, const OptTensor& bias, const OptTensor& task_ids,
                            bool is_feedforward) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::ia3_linear_4bit", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t,
                                           c10::string_view, const OptTensor&, const at::Tensor&, const OptTensor&,
                                           bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, q.out_features,
                       q.blocksize, q.nested_blocksize, q.quant_type, bias, vectors, task_ids, is_feedforward);
    ctx->save_for_backward({is_feedforward ? x : out, vectors, task_ids.value_or(at::Tensor())});
    // The packed weight is module state, kept by reference as the packed tensors it already is.
    ctx->saved_data["packed"] = q.packed;
    ctx->saved_data["absmax"] = q.absmax;
    ctx->saved_data["nested_absmax"] = q.nested_absmax;
    ctx->saved_data["nested_code"] = q.nested_code;
    ctx->saved_data["nested_offset"] = q.nested_offset;
    ctx->saved_data["out_features"] = q.out_features;
    ctx->saved_data["in_features"] = x.size(-1);
    ctx->saved_data["blocksize"] = q.blocksize;
    ctx->saved_data["nested_blocksize"] = q.nested_blocksize;
    ctx->saved_data["quant_type"] = q.quant_type;
    ctx->saved_data["is_feedforward"] = is_feedforward;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::ia3_linear_4bit_backward", "")
            .typed<GradPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, int64_t,
                            c10::string_view, const at::Tensor&, const OptTensor&, bool, const c10::List<bool>&)>();
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_v = ctx->needs_input_grad(1);
    variable_list result(6);
    if (!need_x && !need_v) return result;
    auto& d = ctx->saved_data;
    const bool is_feedforward = d["is_feedforward"].toBool();
    const int64_t out_features = d["out_features"].toInt();
    at::Tensor grad = grads[0];
    if (!grad.defined()) {
      auto shape = saved[0].sizes().vec();
      shape.back() = out_features;
      grad = at::zeros(shape, saved[0].options());
    }
    auto opt = [&](const char* key) { return d[key].isNone() ? OptTensor() : OptTensor(d[key].toTensor()); };
    auto [gx, gv] = op.call(grad, saved[0], d["packed"].toTensor(), d["absmax"].toTensor(), opt("nested_absmax"),
                            opt("nested_code"), opt("nested_offset"), out_features, d["in_features"].toInt(),
                            d["blocksize"].toInt(), d["nested_blocksize"].toInt(), d["quant_type"].toStringRef(),
                            saved[1], optional_of(saved[2]), is_feedforward, c10::List<bool>({need_x, need_v}));
    result[0] = need_x ? gx : at::Tensor();
    result[1] = need_v ? gv : at::Tensor();
    return result;
  }
};

at::Tensor ia3_linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const OptTensor& nested_absmax, const OptTensor& nested_code,
                                    const OptTensor& nested_offset, int64_t out_features, int64_t blocksize,
                                    int64_t nested_blocksize, c10::string_view quant_type, const OptTensor& bias,
                                    const at::Tensor& vectors, const OptTensor& task_ids, bool is_feedforward) {
  check_frozen(bias.value_or(at::Tensor()), "fastpeft.ia3_linear_4bit", "bias");
  Quant4bitArgs q{packed,       absmax,    nested_absmax,    nested_code,
                  nested_offset, out_features, blocksize, nested_blocksize, std::string(quant_type)};
  return Ia3Linear4bitFunction::apply(x, vectors, q, bias, task_ids, is_feedforward);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("ia3_scale", &ia3_scale_autograd);
  m.impl("ia3_linear", &ia3_linear_autograd);
  m.impl("ia3_linear_4bit", &ia3_linear_4bit_autograd);
}

}  // namespace fastpeft
