// Autograd for multi_lora_linear / multi_lora_linear_4bit, in C++.
//
// As for LoRA (csrc/lora/lora_autograd.cpp): torch.library.register_autograd runs Python on every
// call, and for ops with tensor-list arguments (the adapter bank) that is pytree packing of every
// adapter, forward and backward, per layer: more than a multi-LoRA layer's kernels take at small
// and medium sizes. These kernels sit at the Autograd dispatch key and call the device ops below
// it; the fake kernels stay in Python (fastpeft/ops/multi_lora.py) for torch.compile.
//
// Saved for backward, as before: x, the [M, r_max] shrink output, the plan (sorted_rows, offsets),
// the adapters, the dense weight (it may be trainable) and, with dropout, the seed; a 4-bit weight
// by reference as the packed tensors it already is, never dequantized.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor>;

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// Autograd-function inputs are ordered so that the tensors whose gradients matter have fixed
// indices: x, [weight,] lora_A[n], lora_B[n], sorted_rows, offsets, then the optional bias and seed
// (an absent optional tensor is no autograd input), then the non-tensor arguments.
//
// Saved variables: x, shrink, sorted_rows, offsets, lora_A[n], lora_B[n], [weight,] seed (undefined
// when absent).

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

// first_adapter: needs_input_grad index of lora_A[0]; the bias follows lora_B and the plan.
Needs needs_of(AutogradContext* ctx, size_t n, size_t first_adapter, bool has_bias) {
  Needs need;
  need.x = ctx->needs_input_grad(0);
  for (size_t i = 0; i < n; ++i) {
    need.A.push_back(ctx->needs_input_grad(first_adapter + i));
    need.B.push_back(ctx->needs_input_grad(first_adapter + n + i));
  }
  need.bias = has_bias && ctx->needs_input_grad(first_adapter + 2 * n + 2);
  return need;
}

struct Saved {
  at::Tensor x, shrink, sorted_rows, offsets, weight;
  std::vector<at::Tensor> A, B;
  OptTensor seed;
};

void save(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shrink, const at::Tensor& sorted_rows,
          const at::Tensor& offsets, at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& weight,
          const OptTensor& seed, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p, bool has_bias) {
  variable_list saved{x, shrink, sorted_rows, offsets};
  saved.insert(saved.end(), lora_A.begin(), lora_A.end());
  saved.insert(saved.end(), lora_B.begin(), lora_B.end());
  if (weight.defined()) saved.push_back(weight);
  saved.push_back(seed.value_or(at::Tensor()));
  ctx->save_for_backward(saved);
  ctx->saved_data["n"] = static_cast<int64_t>(lora_A.size());
  ctx->saved_data["has_weight"] = weight.defined();
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["scalings"] = scalings.vec();
  ctx->saved_data["dropout_p"] = dropout_p.vec();
  ctx->mark_non_differentiable({shrink});
  // Undefined incoming gradients are handled in backward (no zeros for the shrink's gradient).
  ctx->set_materialize_grads(false);
}

Saved load(AutogradContext* ctx) {
  const auto v = ctx->get_saved_variables();
  const size_t n = ctx->saved_data["n"].toInt();
  Saved s{v[0], v[1], v[2], v[3]};
  s.A.assign(v.begin() + 4, v.begin() + 4 + n);
  s.B.assign(v.begin() + 4 + n, v.begin() + 4 + 2 * n);
  size_t next = 4 + 2 * n;
  if (ctx->saved_data["has_weight"].toBool()) s.weight = v[next++];
  s.seed = optional_of(v[next]);
  return s;
}

// The output no loss reached: zeros of the output's shape, as a Python autograd function would
// have materialized.
at::Tensor grad_out_or_zeros(const at::Tensor& grad, const at::Tensor& x, int64_t out_features) {
  if (grad.defined()) return grad;
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return at::zeros(shape, x.options());
}

void push_adapter_grads(variable_list& result, const Needs& need, const std::vector<at::Tensor>& gA,
                        const std::vector<at::Tensor>& gB) {
  for (size_t i = 0; i < need.A.size(); ++i) result.push_back(need.A[i] ? gA[i] : at::Tensor());
  for (size_t i = 0; i < need.B.size(); ++i) result.push_back(need.B[i] ? gB[i] : at::Tensor());
}

// ---- dense weight --------------------------------------------------------------------------------

struct MultiLoraLinearFunction : public torch::autograd::Function<MultiLoraLinearFunction> {
  // Inputs, one backward slot each: x, weight, lora_A[n], lora_B[n], sorted_rows, offsets, bias,
  // seed, scalings, dropout_p.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& sorted_rows,
                               const at::Tensor& offsets, const OptTensor& bias, const OptTensor& seed,
                               at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::multi_lora_linear", "")
                         .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const OptTensor&, at::TensorList,
                                              at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>,
                                              const OptTensor&, const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrink] = op.call(x, weight, bias, lora_A, lora_B, scalings, dropout_p, seed, sorted_rows, offsets);
    const bool has_bias = bias.has_value() && bias->defined();
    save(ctx, x, shrink, sorted_rows, offsets, lora_A, lora_B, weight, seed, scalings, dropout_p, has_bias);
    return {out, shrink};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::multi_lora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                                           at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::TensorList, at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>,
                             const OptTensor&, const at::Tensor&, const at::Tensor&, const c10::List<bool>&,
                             const c10::List<bool>&)>();
    const size_t n = ctx->saved_data["n"].toInt();
    // needs_input_grad: x (0), weight (1), lora_A (2 ..), lora_B (2+n ..), plan, bias (4+2n).
    Needs need = needs_of(ctx, n, 2, ctx->saved_data["has_bias"].toBool());
    need.weight = ctx->needs_input_grad(1);
    variable_list result;
    if (!need.any()) return variable_list(2 * n + 8);
    const Saved s = load(ctx);
    auto [gx, gA, gB, gW, gb] =
        op.call(grad_out_or_zeros(grads[0], s.x, s.weight.size(0)), s.x, s.shrink, s.weight, s.A, s.B,
                ctx->saved_data["scalings"].toDoubleVector(), ctx->saved_data["dropout_p"].toDoubleVector(), s.seed,
                s.sorted_rows, s.offsets, c10::List<bool>({need.x, need.weight, need.bias}), need.adapter_grads());
    result.push_back(need.x ? gx : at::Tensor());
    result.push_back(need.weight ? gW : at::Tensor());
    push_adapter_grads(result, need, gA, gB);
    result.resize(result.size() + 2);  // sorted_rows, offsets
    result.push_back(need.bias ? gb : at::Tensor());
    result.resize(result.size() + 3);  // seed, scalings, dropout_p
    return result;
  }
};

ForwardResult multi_lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                         at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings,
                                         at::ArrayRef<double> dropout_p, const OptTensor& seed,
                                         const at::Tensor& sorted_rows, const at::Tensor& offsets) {
  auto outs = MultiLoraLinearFunction::apply(x, weight, lora_A, lora_B, sorted_rows, offsets, bias, seed, scalings,
                                             dropout_p);
  return {outs[0], outs[1]};
}

// ---- bitsandbytes 4-bit weight -------------------------------------------------------------------

// The 4-bit weight arguments, carried as one non-differentiable value.
struct Quant4bitArgs {
  at::Tensor packed, absmax;
  OptTensor nested_absmax, nested_code, nested_offset;
  int64_t out_features, blocksize, nested_blocksize;
  std::string quant_type;
};

struct MultiLoraLinear4bitFunction : public torch::autograd::Function<MultiLoraLinear4bitFunction> {
  // Inputs, one backward slot each: x, lora_A[n], lora_B[n], sorted_rows, offsets, bias, seed,
  // quant (one value), scalings, dropout_p.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList lora_A,
                               at::TensorList lora_B, const at::Tensor& sorted_rows, const at::Tensor& offsets,
                               const OptTensor& bias, const OptTensor& seed, const Quant4bitArgs& q,
                               at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::multi_lora_linear_4bit", "")
            .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, c10::string_view,
                                 const OptTensor&, at::TensorList, at::TensorList, at::ArrayRef<double>,
                                 at::ArrayRef<double>, const OptTensor&, const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrink] =
        op.call(x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, q.out_features, q.blocksize,
                q.nested_blocksize, q.quant_type, bias, lora_A, lora_B, scalings, dropout_p, seed, sorted_rows, offsets);
    const bool has_bias = bias.has_value() && bias->defined();
    save(ctx, x, shrink, sorted_rows, offsets, lora_A, lora_B, at::Tensor(), seed, scalings, dropout_p, has_bias);
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
    return {out, shrink};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::multi_lora_linear_4bit_backward", "")
            .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, c10::string_view,
                at::TensorList, at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>, const OptTensor&,
                const at::Tensor&, const at::Tensor&, const c10::List<bool>&, const c10::List<bool>&)>();
    auto& d = ctx->saved_data;
    const size_t n = d["n"].toInt();
    // needs_input_grad: x (0), lora_A (1 ..), lora_B (1+n ..), plan, bias (3+2n).
    const Needs need = needs_of(ctx, n, 1, d["has_bias"].toBool());
    if (!need.any()) return variable_list(2 * n + 8);
    const Saved s = load(ctx);
    const int64_t out_features = d["out_features"].toInt();
    auto opt = [&](const char* key) { return d[key].isNone() ? OptTensor() : OptTensor(d[key].toTensor()); };
    auto [gx, gA, gB, gb] = op.call(
        grad_out_or_zeros(grads[0], s.x, out_features), s.x, s.shrink, d["packed"].toTensor(), d["absmax"].toTensor(),
        opt("nested_absmax"), opt("nested_code"), opt("nested_offset"), out_features, d["blocksize"].toInt(),
        d["nested_blocksize"].toInt(), d["quant_type"].toStringRef(), s.A, s.B, d["scalings"].toDoubleVector(),
        d["dropout_p"].toDoubleVector(), s.seed, s.sorted_rows, s.offsets, c10::List<bool>({need.x, need.bias}),
        need.adapter_grads());
    variable_list result;
    result.push_back(need.x ? gx : at::Tensor());
    push_adapter_grads(result, need, gA, gB);
    result.resize(result.size() + 2);  // sorted_rows, offsets
    result.push_back(need.bias ? gb : at::Tensor());
    result.resize(result.size() + 4);  // seed, quant, scalings, dropout_p
    return result;
  }
};

ForwardResult multi_lora_linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                              const OptTensor& nested_absmax, const OptTensor& nested_code,
                                              const OptTensor& nested_offset, int64_t out_features, int64_t blocksize,
                                              int64_t nested_blocksize, c10::string_view quant_type,
                                              const OptTensor& bias, at::TensorList lora_A, at::TensorList lora_B,
                                              at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
                                              const OptTensor& seed, const at::Tensor& sorted_rows,
                                              const at::Tensor& offsets) {
  Quant4bitArgs q{packed,        absmax,    nested_absmax,    nested_code,
                  nested_offset, out_features, blocksize, nested_blocksize, std::string(quant_type)};
  auto outs = MultiLoraLinear4bitFunction::apply(x, lora_A, lora_B, sorted_rows, offsets, bias, seed, q, scalings,
                                                 dropout_p);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_autograd);
  m.impl("multi_lora_linear_4bit", &multi_lora_linear_4bit_autograd);
}

}  // namespace fastpeft
