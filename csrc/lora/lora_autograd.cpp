// Autograd for lora_linear / lora_linear_4bit / lora_linear_8bit, in C++.
//
// torch.library.register_autograd would run Python on every call: for ops with tensor-list
// arguments that is ~0.3 ms of pytree packing per layer, more than the kernels of a LoRA layer take
// on a GPU at 2k tokens. These kernels sit at the Autograd dispatch key and call the device ops
// below it; the fake (meta) kernels stay in Python (fastpeft/ops/lora.py) for torch.compile, which
// traces through the forward and backward ops.
//
// Saved for backward: x, the [M, sum r] shrink output, and references to the weights and adapters
// (4-bit and int8 weights as the quantized tensors they are); never a dequantized weight or a
// dropout mask.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensorList = c10::List<c10::optional<at::Tensor>>;
using ForwardResult = std::tuple<std::vector<at::Tensor>, at::Tensor>;

// Autograd inputs must be defined tensors, so the biases travel as the list of those present plus
// one flag per projection.
struct Biases {
  std::vector<at::Tensor> present;
  std::vector<bool> has;
};

Biases split_biases(const OptTensorList& biases) {
  Biases b;
  for (size_t i = 0; i < biases.size(); ++i) {
    const c10::optional<at::Tensor> t = biases[i];
    const bool has = t.has_value() && t->defined();
    b.has.push_back(has);
    if (has) b.present.push_back(*t);
  }
  return b;
}

c10::List<bool> to_bool_list(const std::vector<bool>& flags) {
  c10::List<bool> out;
  for (bool f : flags) out.push_back(f);
  return out;
}

OptTensorList join_biases(at::TensorList present, const std::vector<bool>& has) {
  OptTensorList out;
  size_t next = 0;
  for (bool h : has) out.push_back(h ? c10::optional<at::Tensor>(present[next++]) : c10::nullopt);
  return out;
}

// Gradients of the n layer outputs; an output no loss reached comes as an undefined tensor: zeros.
std::vector<at::Tensor> output_grads(const variable_list& grads, const at::Tensor& x,
                                     const std::vector<at::Tensor>& lora_B) {
  std::vector<at::Tensor> g;
  for (size_t i = 0; i < lora_B.size(); ++i) {
    if (grads[i].defined()) {
      g.push_back(grads[i]);
    } else {
      auto shape = x.sizes().vec();
      shape.back() = lora_B[i].size(0);
      g.push_back(at::zeros(shape, x.options()));
    }
  }
  return g;
}

// The 4-bit weight arguments, carried as one non-differentiable value.
struct Quant4bitArgs {
  std::vector<at::Tensor> packed, absmax;
  OptTensorList nested_absmax, nested_code, nested_offset;
  std::vector<int64_t> out_features, blocksizes, nested_blocksizes;
  std::string quant_type;
};

// ---- dense weights ---------------------------------------------------------------------------------

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  // Inputs, flattened as autograd sees them: x, weights[n], the biases present[nb], bias flags,
  // lora_A[n], lora_B[n], scalings, dropout_p, seed.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, std::vector<bool> has_bias, at::TensorList lora_A,
                               at::TensorList lora_B, std::vector<double> scalings, double dropout_p,
                               const c10::optional<at::Tensor>& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::lora_linear", "")
                         .typed<ForwardResult(const at::Tensor&, at::TensorList, const OptTensorList&, at::TensorList,
                                              at::TensorList, at::ArrayRef<double>, double,
                                              const c10::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [outs, shrink] = op.call(x, weights, join_biases(biases, has_bias), lora_A, lora_B, scalings, dropout_p, seed);
    const size_t n = weights.size();
    variable_list saved{x, shrink};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), lora_A.begin(), lora_A.end());
    saved.insert(saved.end(), lora_B.begin(), lora_B.end());
    if (seed.has_value() && seed->defined()) saved.push_back(*seed);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    ctx->saved_data["has_bias"] = to_bool_list(has_bias);
    ctx->saved_data["scalings"] = scalings;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_seed"] = seed.has_value() && seed->defined();
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
                             at::TensorList, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                             at::TensorList, at::ArrayRef<double>, double, const c10::optional<at::Tensor>&,
                             const c10::List<bool>&)>();
    const size_t n = ctx->saved_data["n"].toInt();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& shrink = saved[1];
    std::vector<at::Tensor> weights(saved.begin() + 2, saved.begin() + 2 + n);
    std::vector<at::Tensor> lora_A(saved.begin() + 2 + n, saved.begin() + 2 + 2 * n);
    std::vector<at::Tensor> lora_B(saved.begin() + 2 + 2 * n, saved.begin() + 2 + 3 * n);
    c10::optional<at::Tensor> seed;
    if (ctx->saved_data["has_seed"].toBool()) seed = saved[2 + 3 * n];

    const auto has_bias = ctx->saved_data["has_bias"].toBoolList();
    size_t nb = 0;
    for (bool h : has_bias) nb += h;
    auto any_needed = [&](size_t first, size_t count) {
      for (size_t i = first; i < first + count; ++i)
        if (ctx->needs_input_grad(i)) return true;
      return false;
    };
    // needs_input_grad counts the tensor inputs only: x (0), weights (1 ..), biases present
    // (1+n ..), lora_A (1+n+nb ..), lora_B (1+2n+nb ..). The returned list has a slot per argument.
    const size_t a0 = 1 + n + nb;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = any_needed(1, n), need_b = any_needed(1 + n, nb);
    const bool need_lora = any_needed(a0, n) || any_needed(a0 + n, n);

    const c10::List<bool> mask({need_x, need_lora, need_w, need_b});
    auto [gx, gA, gB, gW, gb] = op.call(output_grads(grads, x, lora_B), x, shrink, weights, lora_A, lora_B,
                                        ctx->saved_data["scalings"].toDoubleVector(),
                                        ctx->saved_data["dropout_p"].toDouble(), seed, mask);
    variable_list result;
    result.push_back(need_x ? gx : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(need_w ? gW[i] : at::Tensor());
    for (size_t i = 0; i < n; ++i)
      if (has_bias[i]) result.push_back(need_b ? gb[i] : at::Tensor());
    result.emplace_back();  // bias flags
    for (size_t i = 0; i < n; ++i) result.push_back(need_lora ? gA[i] : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(need_lora ? gB[i] : at::Tensor());
    result.resize(result.size() + 3);  // scalings, dropout_p, seed
    return result;
  }
};

ForwardResult split_outputs(const variable_list& result) {
  return {std::vector<at::Tensor>(result.begin(), result.end() - 1), result.back()};
}

ForwardResult lora_linear_autograd(const at::Tensor& x, at::TensorList weights, const OptTensorList& biases,
                                   at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings,
                                   double dropout_p, const c10::optional<at::Tensor>& seed) {
  const auto b = split_biases(biases);
  return split_outputs(LoraLinearFunction::apply(x, weights, at::TensorList(b.present), b.has, lora_A, lora_B,
                                                 scalings.vec(), dropout_p, seed));
}

// ---- shared by the quantized-weight functions (4-bit, int8) ----------------------------------------
// Their inputs, flattened as autograd sees them: x, the weight (one non-differentiable value), the
// biases present[nb], bias flags, lora_A[n], lora_B[n], scalings, dropout_p, seed. The weights are
// module state kept by reference in saved_data by each function; everything else is saved here.

variable_list save_lora_state(AutogradContext* ctx, const at::Tensor& x, std::vector<at::Tensor> outs,
                              const at::Tensor& shrink, at::TensorList lora_A, at::TensorList lora_B,
                              const std::vector<bool>& has_bias, const std::vector<double>& scalings,
                              double dropout_p, const c10::optional<at::Tensor>& seed) {
  variable_list saved{x, shrink};
  saved.insert(saved.end(), lora_A.begin(), lora_A.end());
  saved.insert(saved.end(), lora_B.begin(), lora_B.end());
  const bool has_seed = seed.has_value() && seed->defined();
  if (has_seed) saved.push_back(*seed);
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

struct SavedLora {
  size_t n = 0;
  at::Tensor x, shrink;
  std::vector<at::Tensor> lora_A, lora_B, grad_out;
  c10::optional<at::Tensor> seed;
  std::vector<bool> has_bias;
  std::vector<double> scalings;
  double dropout_p = 0.0;
  bool need_x = false, need_b = false, need_lora = false;

  c10::List<bool> mask() const { return c10::List<bool>({need_x, need_lora, need_b}); }
};

SavedLora load_lora_state(AutogradContext* ctx, const variable_list& grads) {
  SavedLora s;
  s.n = ctx->saved_data["n"].toInt();
  const auto saved = ctx->get_saved_variables();
  s.x = saved[0];
  s.shrink = saved[1];
  s.lora_A.assign(saved.begin() + 2, saved.begin() + 2 + s.n);
  s.lora_B.assign(saved.begin() + 2 + s.n, saved.begin() + 2 + 2 * s.n);
  if (ctx->saved_data["has_seed"].toBool()) s.seed = saved[2 + 2 * s.n];
  for (bool h : ctx->saved_data["has_bias"].toBoolList()) s.has_bias.push_back(h);
  s.scalings = ctx->saved_data["scalings"].toDoubleVector();
  s.dropout_p = ctx->saved_data["dropout_p"].toDouble();
  size_t nb = 0;
  for (bool h : s.has_bias) nb += h;
  auto any_needed = [&](size_t first, size_t count) {
    for (size_t i = first; i < first + count; ++i)
      if (ctx->needs_input_grad(i)) return true;
    return false;
  };
  // needs_input_grad counts the tensor inputs only: x (0), biases present (1 ..), lora_A
  // (1+nb ..), lora_B (1+nb+n ..).
  const size_t a0 = 1 + nb;
  s.need_x = ctx->needs_input_grad(0);
  s.need_b = any_needed(1, nb);
  s.need_lora = any_needed(a0, s.n) || any_needed(a0 + s.n, s.n);
  s.grad_out = output_grads(grads, s.x, s.lora_B);
  return s;
}

// The returned list has a slot per argument (see the input order above).
variable_list lora_input_grads(const SavedLora& s, const at::Tensor& gx, const std::vector<at::Tensor>& gA,
                               const std::vector<at::Tensor>& gB, const std::vector<at::Tensor>& gb) {
  variable_list result;
  result.push_back(s.need_x ? gx : at::Tensor());
  result.emplace_back();  // the quantized weight
  for (size_t i = 0; i < s.n; ++i)
    if (s.has_bias[i]) result.push_back(s.need_b ? gb[i] : at::Tensor());
  result.emplace_back();  // bias flags
  for (size_t i = 0; i < s.n; ++i) result.push_back(s.need_lora ? gA[i] : at::Tensor());
  for (size_t i = 0; i < s.n; ++i) result.push_back(s.need_lora ? gB[i] : at::Tensor());
  result.resize(result.size() + 3);  // scalings, dropout_p, seed
  return result;
}

// ---- bitsandbytes 4-bit weights -----------------------------------------------------------------

struct LoraLinear4bitFunction : public torch::autograd::Function<LoraLinear4bitFunction> {
  // Inputs, flattened as autograd sees them: x, quant (one value), the biases present[nb], bias
  // flags, lora_A[n], lora_B[n], scalings, dropout_p, seed.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Quant4bitArgs& q,
                               at::TensorList biases, std::vector<bool> has_bias, at::TensorList lora_A,
                               at::TensorList lora_B, std::vector<double> scalings, double dropout_p,
                               const c10::optional<at::Tensor>& seed) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::lora_linear_4bit", "")
            .typed<ForwardResult(const at::Tensor&, at::TensorList, at::TensorList, const OptTensorList&,
                                 const OptTensorList&, const OptTensorList&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, c10::string_view, const OptTensorList&, at::TensorList,
                                 at::TensorList, at::ArrayRef<double>, double, const c10::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [outs, shrink] = op.call(x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset,
                                  q.out_features, q.blocksizes, q.nested_blocksizes, q.quant_type,
                                  join_biases(biases, has_bias),
                                  lora_A, lora_B, scalings, dropout_p, seed);
    // The frozen packed weights are module state, kept by reference (not autograd-saved activations).
    ctx->saved_data["packed"] = c10::List<at::Tensor>(q.packed);
    ctx->saved_data["absmax"] = c10::List<at::Tensor>(q.absmax);
    ctx->saved_data["nested_absmax"] = q.nested_absmax;
    ctx->saved_data["nested_code"] = q.nested_code;
    ctx->saved_data["nested_offset"] = q.nested_offset;
    ctx->saved_data["out_features"] = q.out_features;
    ctx->saved_data["blocksizes"] = q.blocksizes;
    ctx->saved_data["nested_blocksizes"] = q.nested_blocksizes;
    ctx->saved_data["quant_type"] = q.quant_type;
    return save_lora_state(ctx, x, outs, shrink, lora_A, lora_B, has_bias, scalings, dropout_p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::lora_linear_4bit_backward", "")
            .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
                at::TensorList, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                const OptTensorList&, const OptTensorList&, const OptTensorList&, at::IntArrayRef, at::IntArrayRef,
                at::IntArrayRef, c10::string_view, at::TensorList, at::TensorList, at::ArrayRef<double>, double,
                const c10::optional<at::Tensor>&, const c10::List<bool>&)>();
    const auto s = load_lora_state(ctx, grads);
    auto& d = ctx->saved_data;
    auto [gx, gA, gB, gb] = op.call(s.grad_out, s.x, s.shrink, d["packed"].toTensorVector(),
                                    d["absmax"].toTensorVector(), d["nested_absmax"].toOptionalTensorList(),
                                    d["nested_code"].toOptionalTensorList(), d["nested_offset"].toOptionalTensorList(),
                                    d["out_features"].toIntVector(), d["blocksizes"].toIntVector(),
                                    d["nested_blocksizes"].toIntVector(), d["quant_type"].toStringRef(), s.lora_A,
                                    s.lora_B, s.scalings, s.dropout_p, s.seed, s.mask());
    return lora_input_grads(s, gx, gA, gB, gb);
  }
};

ForwardResult lora_linear_4bit_autograd(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                        const OptTensorList& nested_absmax, const OptTensorList& nested_code,
                                        const OptTensorList& nested_offset, at::IntArrayRef out_features,
                                        at::IntArrayRef blocksizes, at::IntArrayRef nested_blocksizes,
                                        c10::string_view quant_type, const OptTensorList& biases,
                                        at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings,
                                        double dropout_p, const c10::optional<at::Tensor>& seed) {
  Quant4bitArgs q{packed.vec(), absmax.vec(), nested_absmax, nested_code, nested_offset, out_features.vec(),
                  blocksizes.vec(), nested_blocksizes.vec(), std::string(quant_type)};
  const auto b = split_biases(biases);
  return split_outputs(LoraLinear4bitFunction::apply(x, q, at::TensorList(b.present), b.has, lora_A, lora_B,
                                                     scalings.vec(), dropout_p, seed));
}

// ---- bitsandbytes int8 weights --------------------------------------------------------------------

// The int8 weight arguments (CB, SCB), carried as one non-differentiable value.
struct Int8Args {
  std::vector<at::Tensor> weights, scales;
};

struct LoraLinear8bitFunction : public torch::autograd::Function<LoraLinear8bitFunction> {
  // Inputs, flattened as autograd sees them: x, int8 (one value), the biases present[nb], bias
  // flags, lora_A[n], lora_B[n], scalings, dropout_p, seed.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Int8Args& q, at::TensorList biases,
                               std::vector<bool> has_bias, at::TensorList lora_A, at::TensorList lora_B,
                               std::vector<double> scalings, double dropout_p, const c10::optional<at::Tensor>& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastpeft::lora_linear_8bit", "")
                         .typed<ForwardResult(const at::Tensor&, at::TensorList, at::TensorList, const OptTensorList&,
                                              at::TensorList, at::TensorList, at::ArrayRef<double>, double,
                                              const c10::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [outs, shrink] = op.call(x, q.weights, q.scales, join_biases(biases, has_bias), lora_A, lora_B, scalings,
                                  dropout_p, seed);
    // The frozen int8 weights are module state, kept by reference (not autograd-saved activations).
    ctx->saved_data["weights"] = c10::List<at::Tensor>(q.weights);
    ctx->saved_data["scales"] = c10::List<at::Tensor>(q.scales);
    return save_lora_state(ctx, x, outs, shrink, lora_A, lora_B, has_bias, scalings, dropout_p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastpeft::lora_linear_8bit_backward", "")
            .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
                at::TensorList, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                at::TensorList, at::ArrayRef<double>, double, const c10::optional<at::Tensor>&,
                const c10::List<bool>&)>();
    const auto s = load_lora_state(ctx, grads);
    auto [gx, gA, gB, gb] = op.call(s.grad_out, s.x, s.shrink, ctx->saved_data["weights"].toTensorVector(),
                                    ctx->saved_data["scales"].toTensorVector(), s.lora_A, s.lora_B, s.scalings,
                                    s.dropout_p, s.seed, s.mask());
    return lora_input_grads(s, gx, gA, gB, gb);
  }
};

ForwardResult lora_linear_8bit_autograd(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                                        const OptTensorList& biases, at::TensorList lora_A, at::TensorList lora_B,
                                        at::ArrayRef<double> scalings, double dropout_p,
                                        const c10::optional<at::Tensor>& seed) {
  Int8Args q{weights.vec(), scales.vec()};
  const auto b = split_biases(biases);
  return split_outputs(LoraLinear8bitFunction::apply(x, q, at::TensorList(b.present), b.has, lora_A, lora_B,
                                                     scalings.vec(), dropout_p, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("lora_linear_4bit", &lora_linear_4bit_autograd);
  m.impl("lora_linear_8bit", &lora_linear_8bit_autograd);
}

}  // namespace fastpeft
