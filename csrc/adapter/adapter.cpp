// Bottleneck adapters, forward and backward, for a chain of stages with banks of adapters.
//
// Per stage (h: stage input [M, d], res: its residual, z: [M, r]):
//   z   = LN(h) Wd^T + bd                  one GEMM; bias added by the GEMM or the epilogue
//   a~  = [act(z), 1, 0...]                epilogue over [M, r]: activation and a ones column
//   out = res + s * a~ [Wu | bu | 0]^T     one GEMM that reads res as C (beta = 1): the residual is
//                                          added in place and the up bias comes with the GEMM
// Backward keeps per stage only z (the r-wide activation input); LN(h), act(z) and the inputs of
// later stages are recomputed (GEMMs with the small r, and one layer norm: for a single adapter
// ATen's affine layer norm forward and backward, whose backward also gives the affine's gradients).
// Without layer norms a later stage's input is never formed again (StackedInput).
//
// Rational activation (adaptable adapters, adapter/adapter_rational.h): the epilogue evaluates each
// example's adapter's R(z); backward returns dz and the [M, 10] per-row coefficient gradients,
// summed per bank entry here by ia3_task_reduce (deterministic, as for the down bias).
//
// Banks: with adapter_ids, example b uses entry ids[b] of each bank. The GEMMs then run batched
// over examples (bmm against the gathered [B, r, d] / [B, d, r] weights) and the weight gradients
// of the examples that share an entry are summed by a GEMM with the one-hot assignment.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "adapter/adapter.h"
#include "adapter/adapter_rational.h"
#include "common/checks.h"
#include "ia3/ia3.h"  // ia3_task_reduce: the per-bank-entry reduction of the bias, layer-norm and rational grads

namespace fastpeft {

AdapterActivation parse_adapter_activation(const std::string& name, const char* op) {
  if (name == "relu") return AdapterActivation::ReLU;
  if (name == "gelu") return AdapterActivation::GELU;
  if (name == "silu" || name == "swish") return AdapterActivation::SiLU;
  if (name == "rational") return AdapterActivation::Rational;
  TORCH_CHECK(false, op, ": activation must be 'relu', 'gelu', 'silu' (alias 'swish') or 'rational', got '", name,
              "'");
}

namespace {

constexpr const char* kOp = "fastpeft.bottleneck_adapter";

// coeffs: the stage's rational coefficients [N, 10] (act == Rational), else undefined.
void down_epilogue(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                   AdapterActivation act, const at::Tensor& coeffs) {
  if (z.numel() == 0 && a_aug.numel() == 0) return;
#ifdef FASTPEFT_WITH_CUDA
  if (z.is_cuda()) return adapter_down_epilogue_cuda(z, bias, banks, a_aug, act, coeffs);
#endif
  TORCH_CHECK(z.device().is_cpu(), "fastpeft bottleneck adapter: no kernel for device ", z.device());
  if (act != AdapterActivation::Rational) return adapter_down_epilogue_cpu(z, bias, banks, a_aug, act);
  // The bias add and the ones column as for the other activations (the ReLU written into a~ is
  // then overwritten by R(z): one extra pass over [M, r], far below the rational's own cost).
  adapter_down_epilogue_cpu(z, bias, banks, a_aug, AdapterActivation::ReLU);
  adapter_rational_forward_cpu(z, coeffs, banks, a_aug.narrow(1, 0, z.size(1)));
}

// dz = grad_a * act'(z) in place. For the rational activation also returns the coefficient
// gradients [N, 10] in coeffs' dtype (else an undefined tensor).
at::Tensor activation_backward(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act,
                               const at::Tensor& coeffs, const TaskMap& banks) {
  if (act != AdapterActivation::Rational) {
    if (z.numel() == 0) return at::Tensor();
#ifdef FASTPEFT_WITH_CUDA
    if (z.is_cuda()) return adapter_activation_backward_cuda(grad_a, z, act, 1.0f), at::Tensor();
#endif
    TORCH_CHECK(z.device().is_cpu(), "fastpeft bottleneck adapter: no kernel for device ", z.device());
    return adapter_activation_backward_cpu(grad_a, z, act, 1.0f), at::Tensor();
  }
  at::Tensor row_grads;  // [M, 10] float32
#ifdef FASTPEFT_WITH_CUDA
  if (z.is_cuda()) row_grads = adapter_rational_backward_cuda(grad_a, z, coeffs, banks);
#endif
  if (!row_grads.defined()) {
    TORCH_CHECK(z.device().is_cpu(), "fastpeft bottleneck adapter: no kernel for device ", z.device());
    row_grads = adapter_rational_backward_cpu(grad_a, z, coeffs, banks);
  }
  // Rows -> bank entries by the same deterministic per-entry reduction as the down bias's gradient.
  return ia3_task_reduce(row_grads, at::Tensor(), at::Tensor(), banks, false, nullptr).to(coeffs.scalar_type());
}

// alpha * a @ b rounded once (beta = 0: the output's old values are ignored, NaNs included).
at::Tensor mm_scaled(const at::Tensor& a, const at::Tensor& b, double alpha) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0.0, alpha);
}

at::Tensor bmm_scaled(const at::Tensor& a, const at::Tensor& b, double alpha) {
  auto out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  return at::baddbmm_out(out, out, a, b, /*beta=*/0.0, alpha);
}

int64_t padded_rank(int64_t r) { return (r + 1 + 7) / 8 * 8; }

struct Stage {
  at::Tensor Wd, bd, Wu, bu, ln_w, ln_b;  // banks [N, ...]; ln_* undefined without layer norm
  at::Tensor coeffs;                      // rational activation [N, 10]; undefined for the others
  TaskMap banks;
  double scaling = 1.0;
  int64_t r = 0;
  bool banked() const { return !banks.single(); }
  int64_t N() const { return Wd.size(0); }
};

struct Chain {
  std::vector<Stage> stages;
  AdapterActivation act;
  double eps;
  int64_t d = 0;
};

Chain make_chain(const at::Tensor& x, at::TensorList Wd, at::TensorList bd, at::TensorList Wu, at::TensorList bu,
                 at::TensorList ln_w, at::TensorList ln_b, at::TensorList coeffs,
                 const c10::List<c10::optional<at::Tensor>>& ids, at::ArrayRef<double> scalings,
                 c10::string_view activation, double eps, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., hidden]");
  const size_t n = Wd.size();
  TORCH_CHECK(n >= 1, op, ": down_weight must hold at least one adapter stage");
  TORCH_CHECK(bd.size() == n && Wu.size() == n && bu.size() == n && ids.size() == n && scalings.size() == n, op,
              ": down_weight, down_bias, up_weight, up_bias, adapter_ids and scalings need one entry per stage; got ",
              n, ", ", bd.size(), ", ", Wu.size(), ", ", bu.size(), ", ", ids.size(), ", ", scalings.size());
  TORCH_CHECK(ln_w.size() == ln_b.size() && (ln_w.empty() || ln_w.size() == n), op,
              ": ln_weight and ln_bias must both be empty (no layer norm) or hold one bank per stage; got ",
              ln_w.size(), " and ", ln_b.size(), " for ", n, " stages");
  TORCH_CHECK(eps > 0.0, op, ": ln_eps must be positive, got ", eps);
  Chain chain;
  chain.act = parse_adapter_activation(std::string(activation), op);
  const bool rational = chain.act == AdapterActivation::Rational;
  TORCH_CHECK(rational ? coeffs.size() == n : coeffs.empty(), op, ": rational_coeffs must hold one [num_adapters, ",
              kRationalCoeffs, "] bank per stage for activation 'rational' and be empty otherwise; got ",
              coeffs.size(), " for ", n, " stages and activation '", std::string(activation), "'");
  chain.eps = eps;
  chain.d = x.size(-1);
  const int64_t d = chain.d;
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    auto check_bank = [&](const at::Tensor& t, const std::string& name, std::vector<int64_t> shape, int64_t N) {
      check_dtype(t, x.scalar_type(), op, name + idx, " (the dtype of x; cast the adapter to the compute dtype)");
      check_same_device(t, x, op, name + idx, "x");
      shape.insert(shape.begin(), N);
      TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, idx, " must be ", at::IntArrayRef(shape),
                  " ([num_adapters, ...]), got ", t.sizes());
    };
    Stage s;
    TORCH_CHECK(Wd[i].dim() == 3, op, ": down_weight", idx, " must be 3-D [num_adapters, r, ", d, "], got shape ",
                Wd[i].sizes());
    const int64_t N = Wd[i].size(0);
    s.r = Wd[i].size(1);
    TORCH_CHECK(N >= 1 && s.r >= 1, op, ": down_weight", idx, " must hold >= 1 adapter of rank r >= 1, got shape ",
                Wd[i].sizes());
    check_bank(Wd[i], "down_weight", {s.r, d}, N);
    check_bank(bd[i], "down_bias", {s.r}, N);
    check_bank(Wu[i], "up_weight", {d, s.r}, N);
    check_bank(bu[i], "up_bias", {d}, N);
    s.Wd = Wd[i].contiguous();
    s.bd = bd[i].contiguous();
    s.Wu = Wu[i].contiguous();
    s.bu = bu[i].contiguous();
    if (!ln_w.empty()) {
      check_bank(ln_w[i], "ln_weight", {d}, N);
      check_bank(ln_b[i], "ln_bias", {d}, N);
      s.ln_w = ln_w[i].contiguous();
      s.ln_b = ln_b[i].contiguous();
    }
    if (rational) {
      check_bank(coeffs[i], "rational_coeffs", {kRationalCoeffs}, N);
      s.coeffs = coeffs[i].contiguous();
    }
    const std::string ids_name = "adapter_ids" + idx;
    const std::string bank_name = "down_weight" + idx;
    s.banks = make_task_map_from_ids(x, N, ids[i], op, ids_name.c_str(), bank_name.c_str());
    s.scaling = scalings[i];
    chain.stages.push_back(s);
  }
  return chain;
}

// bank[ids] for a bank [N, ...]: each example's entry, [B, ...]. Row gathers through embedding,
// which copies whole rows (index_select's CPU path is element-wise and ~100x slower here).
at::Tensor gather_bank(const at::Tensor& bank, const at::Tensor& ids) {
  std::vector<int64_t> shape(bank.sizes().begin(), bank.sizes().end());
  shape[0] = ids.size(0);
  return at::embedding(bank.reshape({bank.size(0), -1}), ids).view(shape);
}

// Rows of example b: [B, S, .] views of [M, .] tensors for the batched (banked) GEMMs.
at::Tensor by_example(const at::Tensor& t, const TaskMap& banks) {
  return t.view({banks.num_examples, banks.rows_per_example, t.size(-1)});
}

at::Tensor up_augmented(const Stage& s) {
  // [N, d, r_pad] = [Wu | bu | 0]
  const int64_t pad = padded_rank(s.r) - s.r - 1;
  auto parts = std::vector<at::Tensor>{s.Wu, s.bu.unsqueeze(-1)};
  if (pad > 0) parts.push_back(at::zeros({s.N(), s.Wu.size(1), pad}, s.Wu.options()));
  return at::cat(parts, -1);
}

struct Normed {
  at::Tensor h;           // LN(h) with the affine of each example's adapter (or h itself)
  at::Tensor plain;       // LN(h) before the affine (banked layer norm only)
  at::Tensor mean, rstd;  // layer-norm statistics
};

// want_plain (backward): also keep the normalised h before the affine, for the affine's gradients.
Normed normalize(const Stage& s, const at::Tensor& h, double eps, bool want_plain = false) {
  Normed n;
  if (!s.ln_w.defined()) {
    n.h = h;
    return n;
  }
  const int64_t d = h.size(-1);
  if (!s.banked() && !want_plain) {
    std::tie(n.h, n.mean, n.rstd) = at::native_layer_norm(h, {d}, s.ln_w[0], s.ln_b[0], eps);
    return n;
  }
  std::tie(n.plain, n.mean, n.rstd) = at::native_layer_norm(h, {d}, c10::nullopt, c10::nullopt, eps);
  if (!s.banked()) {
    n.h = at::addcmul(s.ln_b[0], n.plain, s.ln_w[0]);
    return n;
  }
  const auto w = gather_bank(s.ln_w, s.banks.ids).unsqueeze(1);
  const auto b = gather_bank(s.ln_b, s.banks.ids).unsqueeze(1);
  n.h = at::addcmul(b, by_example(n.plain, s.banks), w).view(h.sizes());
  return n;
}

// z = hn Wd^T + bd (z is what backward keeps) and a~ = [act(z), 1, 0..].
std::pair<at::Tensor, at::Tensor> down_project(const Stage& s, const at::Tensor& hn, AdapterActivation act) {
  const int64_t M = hn.size(0);
  at::Tensor z;
  at::Tensor bias_for_epilogue;
  if (!s.banked()) {
    z = at::addmm(s.bd[0], hn, s.Wd[0].t());
  } else {
    const auto W = gather_bank(s.Wd, s.banks.ids);  // [B, r, d]
    z = at::bmm(by_example(hn, s.banks), W.transpose(1, 2)).view({M, s.r});
    bias_for_epilogue = s.bd;
  }
  auto a_aug = at::empty({M, padded_rank(s.r)}, hn.options());
  down_epilogue(z, bias_for_epilogue, s.banks, a_aug, act, s.coeffs);
  return {z, a_aug};
}

// out = res + s * a~ [Wu | bu | 0]^T, the residual read as the GEMM's C operand.
at::Tensor up_project(const Stage& s, const at::Tensor& a_aug, const at::Tensor& res) {
  const auto U = up_augmented(s);  // [N, d, r_pad]
  if (!s.banked()) return at::addmm(res, a_aug, U[0].t(), /*beta=*/1.0, /*alpha=*/s.scaling);
  const auto Ug = gather_bank(U, s.banks.ids);  // [B, d, r_pad]
  return at::baddbmm(by_example(res, s.banks), by_example(a_aug, s.banks), Ug.transpose(1, 2), 1.0, s.scaling)
      .view(res.sizes());
}

std::tuple<at::Tensor, std::vector<at::Tensor>> bottleneck_adapter(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, at::TensorList Wd, at::TensorList bd,
    at::TensorList Wu, at::TensorList bu, at::TensorList ln_w, at::TensorList ln_b, at::TensorList coeffs,
    const c10::List<c10::optional<at::Tensor>>& ids, at::ArrayRef<double> scalings, c10::string_view activation,
    double eps) {
  const auto chain = make_chain(x, Wd, bd, Wu, bu, ln_w, ln_b, coeffs, ids, scalings, activation, eps, kOp);
  const int64_t d = chain.d;
  const auto x2 = x.reshape({-1, d}).contiguous();
  at::Tensor res = x2;
  if (residual.has_value() && residual->defined()) {
    check_dtype(*residual, x.scalar_type(), kOp, "residual", " (the dtype of x)");
    check_same_device(*residual, x, kOp, "residual", "x");
    TORCH_CHECK(residual->sizes() == x.sizes(), kOp, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    res = residual->reshape({-1, d}).contiguous();
  }
  std::vector<at::Tensor> saved;
  at::Tensor h = x2;
  for (const auto& s : chain.stages) {
    const auto hn = normalize(s, h, chain.eps).h;
    auto za = down_project(s, hn, chain.act);
    saved.push_back(za.first);
    h = up_project(s, za.second, res);
    res = h;  // a stacked stage adds onto the previous stage's output
  }
  return {h.view(x.sizes()), saved};
}

at::Tensor sum_per_bank(const at::Tensor& per_example, const Stage& s) {
  // per_example [B, ...] -> [N, ...], summing the examples that share an adapter: one GEMM with
  // the [N, B] one-hot assignment (float32 accumulation, one rounding, no atomics).
  const auto banks = at::arange(s.N(), s.banks.ids.options()).unsqueeze(1);
  const auto onehot = banks.eq(s.banks.ids.unsqueeze(0)).to(per_example.scalar_type());
  return at::mm(onehot, per_example.reshape({per_example.size(0), per_example.size(1) * per_example.size(2)}))
      .view({s.N(), per_example.size(1), per_example.size(2)});
}

// The input of a stacked stage k >= 1 as the forward built it: h_k = base + sum_j s_j a~_j U_j^T
// over the stages j < k (base: the first stage's residual). A stage without a layer norm needs h_k
// only for its down weight's gradient dz^T h_k, which distributes over that sum: dz^T base plus
// s_j (dz^T a~_j) U_j^T, where dz^T a~_j is only [r, r_pad]. So h_k is never recomputed: no
// [M, r_pad] x [r_pad, d] GEMM and no [M, d] tensor per stacked stage.
// One StackedInput serves every stage of the chain: stage k's input is base plus the terms j < k.
struct StackedInput {
  at::Tensor base;                 // [M, d]
  std::vector<at::Tensor> a_aug;   // a~_j of every stage but the last, [M, r_pad_j]
  const std::vector<Stage>* stages = nullptr;  // the chain's stages (U_j, scaling and banks)
};

// dz^T h_k for every example ([B, r, d]) when `per_example`, else summed over all rows ([r, d]).
// The [r, r_pad] products and the sum are float32; one rounding to the compute dtype at the end.
at::Tensor stacked_down_weight_grad(const at::Tensor& dz, const StackedInput& in, size_t k, const TaskMap& banks,
                                    bool per_example) {
  const auto dz32 = dz.to(at::kFloat);
  at::Tensor total = per_example ? at::bmm(by_example(dz, banks).transpose(1, 2), by_example(in.base, banks))
                                 : at::mm(dz.t(), in.base);
  total = total.to(at::kFloat);
  for (size_t j = 0; j < k; ++j) {
    const Stage& sj = (*in.stages)[j];
    const auto U = up_augmented(sj).to(at::kFloat);  // [N_j, d, r_pad_j]
    const auto a32 = in.a_aug[j].to(at::kFloat);
    at::Tensor term;
    if (!per_example && !sj.banked()) {
      term = at::mm(at::mm(dz32.t(), a32), U[0].t());  // [r, d]
    } else {
      const TaskMap& b = sj.banked() ? sj.banks : banks;  // both views cut [M] into the same examples
      const auto C = at::bmm(by_example(dz32, b).transpose(1, 2), by_example(a32, b));  // [B, r, r_pad_j]
      term = sj.banked() ? at::bmm(C, gather_bank(U, sj.banks.ids).transpose(1, 2)) : at::matmul(C, U[0].t());
      if (!per_example) term = term.sum(0);
    }
    total.add_(term, sj.scaling);
  }
  return total.to(dz.scalar_type());
}

// Gradients of one stage. g: grad of the stage output [M, d]; h: stage input; z: saved.
struct StageGrads {
  at::Tensor h;  // through the adapter branch only (the residual's share is g itself)
  at::Tensor Wd, bd, Wu, bu, ln_w, ln_b;
  at::Tensor coeffs;  // rational activation only
};

// `stacked` (the chain's stages have no layer norm): stage k's input h is undefined for k >= 1 and
// its down weight's gradient comes from the input's parts; a~ of stages before the last is
// taken from there rather than computed again.
StageGrads stage_backward(const Stage& s, const at::Tensor& g, const at::Tensor& h, const at::Tensor& z,
                          const Chain& chain, bool need_h, bool need_adapter, bool need_ln, bool need_coeffs,
                          const StackedInput* stacked = nullptr, size_t k = 0) {
  StageGrads out;
  const int64_t M = g.size(0), d = chain.d, r_pad = padded_rank(s.r);
  at::Tensor a_aug;
  if (stacked && k < stacked->a_aug.size()) {
    a_aug = stacked->a_aug[k];
  } else {
    a_aug = at::empty({M, r_pad}, g.options());
    auto z_copy = z;  // epilogue without bias only reads z
    down_epilogue(z_copy, at::Tensor(), s.banks, a_aug, chain.act, s.coeffs);
  }
  const bool from_parts = stacked && k > 0;
  // grad of a~ through the up GEMM, then through the activation: dz = (g (s Wu)) * act'(z), the
  // scaling applied by the GEMM (alpha) rather than by a pass over [M, r].
  at::Tensor dz;
  if (!s.banked()) {
    dz = mm_scaled(g, s.Wu[0], s.scaling);
  } else {
    const auto Wu_g = gather_bank(s.Wu, s.banks.ids);  // [B, d, r]
    dz = bmm_scaled(by_example(g, s.banks), Wu_g, s.scaling).view({M, s.r});
  }
  auto g_coeffs = activation_backward(dz, z, chain.act, s.coeffs, s.banks);
  if (need_coeffs) out.coeffs = g_coeffs;
  // A single adapter's layer norm runs forward and backward in ATen with its affine (the affine's
  // gradients come out of the same pass); a bank needs the normalised h before the affine.
  Normed n = from_parts ? Normed{} : normalize(s, h, chain.eps, /*want_plain=*/s.banked());
  if (need_adapter) {
    at::Tensor gU, gWd;
    if (!s.banked()) {
      gU = mm_scaled(g.t(), a_aug, s.scaling).unsqueeze(0);  // [1, d, r_pad]: [gWu | gbu | .]
      gWd = (from_parts ? stacked_down_weight_grad(dz, *stacked, k, s.banks, false) : at::mm(dz.t(), n.h))
                .unsqueeze(0);
    } else {
      gU = sum_per_bank(bmm_scaled(by_example(g, s.banks).transpose(1, 2), by_example(a_aug, s.banks), s.scaling), s);
      gWd = sum_per_bank(from_parts ? stacked_down_weight_grad(dz, *stacked, k, s.banks, true)
                                 : at::bmm(by_example(dz, s.banks).transpose(1, 2), by_example(n.h, s.banks)),
                         s);
    }
    out.Wu = gU.narrow(2, 0, s.r).contiguous();
    out.bu = gU.select(2, s.r).contiguous();
    out.Wd = gWd;
    out.bd = ia3_task_reduce(dz, at::Tensor(), at::Tensor(), s.banks, false, nullptr).to(dz.scalar_type());
  }
  // Free the recomputed [M, d] LN(h) (and a~) before the input gradient allocates its own [M, d]
  // tensors: one [M, d] tensor less at the backward's peak.
  n.h = at::Tensor();
  a_aug = at::Tensor();
  if (!need_h && !(need_ln && s.ln_w.defined())) return out;
  at::Tensor ghn;
  if (!s.banked()) {
    ghn = at::mm(dz, s.Wd[0]);
  } else {
    ghn = at::bmm(by_example(dz, s.banks), gather_bank(s.Wd, s.banks.ids)).view({M, d});
  }
  if (!s.ln_w.defined()) {
    out.h = ghn;
    return out;
  }
  if (!s.banked()) {
    auto [gh, gw, gb] = at::native_layer_norm_backward(ghn, h, {d}, n.mean, n.rstd, s.ln_w[0], s.ln_b[0],
                                                       {need_h, need_ln, need_ln});
    if (need_ln) {
      out.ln_w = gw.unsqueeze(0);
      out.ln_b = gb.unsqueeze(0);
    }
    out.h = gh;
    return out;
  }
  // Banked layer norm: hn = plain * w[bank] + b[bank] with plain the normalised h. The affine's
  // gradients are per-bank reductions with float32 accumulation.
  const at::Tensor& plain = n.plain;
  if (need_ln) {
    out.ln_w = ia3_task_reduce(ghn, plain, at::Tensor(), s.banks, false, nullptr).to(ghn.scalar_type());
    out.ln_b = ia3_task_reduce(ghn, at::Tensor(), at::Tensor(), s.banks, false, nullptr).to(ghn.scalar_type());
  }
  if (need_h) {
    const auto g_plain = (by_example(ghn, s.banks) * gather_bank(s.ln_w, s.banks.ids).unsqueeze(1)).view({M, d});
    out.h = std::get<0>(at::native_layer_norm_backward(g_plain, h, {d}, n.mean, n.rstd, c10::nullopt, c10::nullopt,
                                                       {true, false, false}));
  }
  return out;
}

// output_mask: [x, residual, adapter weights and biases, layer-norm weights and biases, rational
// coefficients].
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
bottleneck_adapter_backward(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                            at::TensorList saved, at::TensorList Wd, at::TensorList bd, at::TensorList Wu,
                            at::TensorList bu, at::TensorList ln_w, at::TensorList ln_b, at::TensorList coeffs,
                            const c10::List<c10::optional<at::Tensor>>& ids, at::ArrayRef<double> scalings,
                            c10::string_view activation, double eps, const c10::List<bool>& output_mask) {
  constexpr const char* op = "fastpeft.bottleneck_adapter_backward";
  const auto chain = make_chain(x, Wd, bd, Wu, bu, ln_w, ln_b, coeffs, ids, scalings, activation, eps, op);
  TORCH_CHECK(output_mask.size() == 5, op, ": output_mask must have 5 entries, got ", output_mask.size());
  const size_t n = chain.stages.size();
  TORCH_CHECK(saved.size() == n, op, ": saved must hold one [M, r] tensor per stage, got ", saved.size());
  const int64_t d = chain.d;
  const auto x2 = x.reshape({-1, d}).contiguous();
  const int64_t M = x2.size(0);
  check_dtype(grad_out, x.scalar_type(), op, "grad_out", " (the dtype of x)");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(saved[i].dim() == 2 && saved[i].size(0) == M && saved[i].size(1) == chain.stages[i].r, op,
                ": saved[", i, "] must be [", M, ", ", chain.stages[i].r, "], got ", saved[i].sizes());
  }
  const bool has_res = residual.has_value() && residual->defined();
  const bool need_x = output_mask[0], need_res = output_mask[1] && has_res;
  const bool need_adapter = output_mask[2];
  const bool need_ln = output_mask[3] && chain.stages[0].ln_w.defined();
  const bool need_coeffs = output_mask[4] && chain.act == AdapterActivation::Rational;

  // Inputs of every stage: x, then each stage's output, rebuilt from the saved z. Stages with a
  // layer norm need their input itself (one up GEMM each); without one, a stage's input stays in
  // parts (StackedInput: the first residual and each earlier stage's a~, [M, r_pad]).
  const bool stacked_parts = !chain.stages[0].ln_w.defined();  // layer norms are on every stage or none
  std::vector<at::Tensor> inputs{x2};
  at::Tensor res = has_res ? residual->reshape({-1, d}).contiguous() : x2;
  StackedInput parts{res, {}, &chain.stages};
  for (size_t i = 0; i + 1 < n; ++i) {
    const auto& s = chain.stages[i];
    auto a_aug = at::empty({M, padded_rank(s.r)}, x2.options());
    auto z = saved[i].contiguous();
    down_epilogue(z, at::Tensor(), s.banks, a_aug, chain.act, s.coeffs);
    if (stacked_parts) {
      parts.a_aug.push_back(a_aug);
      inputs.push_back(at::Tensor());
      continue;
    }
    res = up_project(s, a_aug, res);
    inputs.push_back(res);
  }

  std::vector<at::Tensor> gWd(n), gbd(n), gWu(n), gbu(n), gln_w, gln_b, gcoeffs;
  if (need_ln) {
    gln_w.resize(n);
    gln_b.resize(n);
  }
  if (need_coeffs) gcoeffs.resize(n);
  at::Tensor g = grad_out.reshape({-1, d}).contiguous();
  at::Tensor grad_x, grad_res;
  for (size_t k = n; k-- > 0;) {
    const bool first = k == 0;
    const bool need_h = first ? need_x : true;
    auto sg = stage_backward(chain.stages[k], g, inputs[k], saved[k].contiguous(), chain, need_h, need_adapter, need_ln,
                             need_coeffs, stacked_parts ? &parts : nullptr, k);
    if (need_coeffs) gcoeffs[k] = sg.coeffs;
    if (need_adapter) {
      gWd[k] = sg.Wd;
      gbd[k] = sg.bd;
      gWu[k] = sg.Wu;
      gbu[k] = sg.bu;
    }
    if (need_ln) {
      gln_w[k] = sg.ln_w;
      gln_b[k] = sg.ln_b;
    }
    if (!first) {
      g = sg.h.add_(g);  // stage k's input is also its residual
      continue;
    }
    if (has_res) {
      // One stage: g is grad_out itself, which an op's output must not alias (the autograd kernel
      // passes grad_out on as the residual's gradient instead of asking for this copy).
      if (need_res) grad_res = (n == 1 ? g.clone() : g).view(x.sizes());
      if (need_x) grad_x = sg.h.view(x.sizes());
    } else if (need_x) {
      grad_x = sg.h.add_(g).view(x.sizes());
    }
  }
  if (!grad_x.defined()) grad_x = at::empty({0}, x.options());
  if (!grad_res.defined()) grad_res = at::empty({0}, x.options());
  if (!need_adapter) gWd.clear(), gbd.clear(), gWu.clear(), gbu.clear();
  return {grad_x, grad_res, gWd, gbd, gWu, gbu, gln_w, gln_b, gcoeffs};
}

}  // namespace

// One device-generic body: GEMMs in ATen, the epilogues pick the device's kernel.
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward);
}

}  // namespace fastpeft
