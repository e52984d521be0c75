// Fused LoRA linear, forward and backward, over any frozen-weight format (common/frozen_weights.h:
// dense, bitsandbytes 4-bit, bitsandbytes int8).
//
// One composite body serves every device: GEMMs go to ATen (cuBLAS / MKL), the dropout-fused
// pieces and the dequantization go through the dispatcher to this library's device kernels.
//
// Memory rules (the point of the op):
//  - the LoRA product is accumulated into the base output in place (GEMM with beta = 1);
//  - dropout is applied inside the shrink kernel: no M x K mask or dropped x exists;
//  - a 4-bit or int8 weight is dequantized into the shared workspace, used, and dropped; backward
//    dequantizes again;
//  - what backward needs of the activations is x and the M x r shrink output, nothing else.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "common/checks.h"
#include "lora/lora.h"

namespace fastpeft {

namespace {

constexpr const char* kOp = "fastpeft.lora_linear";

struct LoraArgs {
  int64_t in_features = 0;
  std::vector<int64_t> ranks;  // r_i
  int64_t total_rank = 0;
};

// Checks the LoRA matrices and everything that must agree with x; returns the ranks.
LoraArgs check_lora_args(const at::Tensor& x, const FrozenWeights& W, at::TensorList lora_A,
                         at::TensorList lora_B, at::ArrayRef<double> scalings) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  const size_t n = W.size();
  TORCH_CHECK(n >= 1, kOp, ": weights must hold at least one weight");
  TORCH_CHECK(lora_A.size() == n && lora_B.size() == n && scalings.size() == n, kOp,
              ": weights, lora_A, lora_B and scalings must have one entry per projection; got ", n, ", ",
              lora_A.size(), ", ", lora_B.size(), ", ", scalings.size());
  LoraArgs args;
  args.in_features = x.size(-1);
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const auto& A = lora_A[i];
    const auto& B = lora_B[i];
    check_dim(A, 2, kOp, "lora_A" + idx);
    check_dim(B, 2, kOp, "lora_B" + idx);
    check_dtype(A, x.scalar_type(), kOp, "lora_A" + idx, " (the dtype of x; cast the adapter to the compute dtype)");
    check_dtype(B, x.scalar_type(), kOp, "lora_B" + idx, " (the dtype of x; cast the adapter to the compute dtype)");
    check_same_device(A, x, kOp, "lora_A" + idx, "x");
    check_same_device(B, x, kOp, "lora_B" + idx, "x");
    const int64_t r = A.size(0);
    TORCH_CHECK(r >= 1, kOp, ": rank r of lora_A", idx, " must be >= 1, got ", r);
    TORCH_CHECK(A.size(1) == args.in_features, kOp, ": lora_A", idx, " must be [r, ", args.in_features,
                "] (x has ", args.in_features, " features), got ", A.sizes());
    TORCH_CHECK(B.size(0) == W[i].out_features && B.size(1) == r, kOp, ": lora_B", idx, " must be [",
                W[i].out_features, ", ", r, "] (out_features x r), got ", B.sizes());
    args.ranks.push_back(r);
    args.total_rank += r;
  }
  return args;
}

void check_biases(const at::Tensor& x, const FrozenWeights& W, const c10::List<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(biases.size() == W.size(), kOp, ": biases must have one entry (or None) per weight, got ",
              biases.size(), " for ", W.size(), " weights");
  for (size_t i = 0; i < biases.size(); ++i) {
    const c10::optional<at::Tensor> b = biases[i];
    if (!b.has_value() || !b->defined()) continue;
    const std::string name = "biases[" + std::to_string(i) + "]";
    check_dtype(*b, x.scalar_type(), kOp, name, " (the dtype of x)");
    check_same_device(*b, x, kOp, name, "x");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == W[i].out_features, kOp, ": ", name, " must be [",
                W[i].out_features, "], got ", b->sizes());
  }
}

at::Tensor concat_rows(at::TensorList mats) {
  return mats.size() == 1 ? mats[0].contiguous() : at::cat(mats, 0);
}

at::Tensor call_shrink_dropout(const at::Tensor& x, const at::Tensor& A, double p, const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::lora_shrink_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  return op.call(x, A, p, seed);
}

void call_grad_x_dropout_accum(at::Tensor& gx, const at::Tensor& g, const at::Tensor& A, double p,
                               const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::lora_grad_x_dropout_accum_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  op.call(gx, g, A, p, seed);
}

std::vector<int64_t> with_last(at::IntArrayRef lead_and_last, int64_t last) {
  std::vector<int64_t> shape(lead_and_last.begin(), lead_and_last.end());
  shape.back() = last;
  return shape;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> lora_forward(
    const at::Tensor& x, const FrozenWeights& W, const c10::List<c10::optional<at::Tensor>>& biases,
    at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  const auto args = check_lora_args(x, W, lora_A, lora_B, scalings);
  check_biases(x, W, biases);
  const auto dropout_seed = seed_if_dropout(dropout_p, seed, kOp);
  const int64_t K = args.in_features;
  const auto x2 = as_rows(x).contiguous();

  const auto A_cat = concat_rows(lora_A);
  const auto shrink = dropout_seed ? call_shrink_dropout(x2, A_cat, dropout_p, *dropout_seed) : at::mm(x2, A_cat.t());

  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  for (size_t i = 0; i < W.size(); ++i) {
    auto w = W.materialize(i, x.scalar_type(), x.device());
    const c10::optional<at::Tensor> bias = biases[i];
    auto out = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    w = at::Tensor();  // release the workspace before the next projection takes it
    out.addmm_(shrink.narrow(1, offset, args.ranks[i]), lora_B[i].t(), /*beta=*/1.0, /*alpha=*/scalings[i]);
    outs.push_back(out.view(with_last(x.sizes(), W[i].out_features)));
    offset += args.ranks[i];
  }
  return {outs, shrink};
}

struct Grads {
  at::Tensor x;
  std::vector<at::Tensor> A, B, weights, biases;
};

// output_mask: [x, lora (A and B), weights, biases].
Grads lora_backward(at::TensorList grad_outs, const at::Tensor& x, const at::Tensor& shrink,
                    const FrozenWeights& W, at::TensorList lora_A, at::TensorList lora_B,
                    at::ArrayRef<double> scalings, double dropout_p, const c10::optional<at::Tensor>& seed,
                    std::array<bool, 4> output_mask) {
  const auto args = check_lora_args(x, W, lora_A, lora_B, scalings);
  const auto dropout_seed = seed_if_dropout(dropout_p, seed, kOp);
  TORCH_CHECK(grad_outs.size() == W.size(), kOp, "_backward: expected ", W.size(), " grad_outs, got ", grad_outs.size());
  const int64_t K = args.in_features;
  const auto x2 = as_rows(x).contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(shrink.dim() == 2 && shrink.size(0) == M && shrink.size(1) == args.total_rank, kOp,
              "_backward: shrink must be [", M, ", ", args.total_rank, "], got ", shrink.sizes());

  std::vector<at::Tensor> g;
  for (size_t i = 0; i < W.size(); ++i) {
    check_dtype(grad_outs[i], x.scalar_type(), kOp, "grad_outs[" + std::to_string(i) + "]", " (the dtype of x)");
    TORCH_CHECK(grad_outs[i].numel() == M * W[i].out_features, kOp, "_backward: grad_outs[", i, "] has shape ",
                grad_outs[i].sizes(), ", expected [..., ", W[i].out_features, "] with ", M, " rows");
    g.push_back(grad_outs[i].reshape({M, W[i].out_features}).contiguous());
  }

  Grads grads;
  const bool need_x = output_mask[0], need_lora = output_mask[1], need_w = output_mask[2], need_b = output_mask[3];
  at::Tensor grad_shrink;  // d loss / d shrink = scaling_i * g_i B_i, [M, total_rank]
  if (need_x || need_lora) {
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < W.size(); ++i) parts.push_back(at::mm(g[i], lora_B[i]).mul_(scalings[i]));
    grad_shrink = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  }
  if (need_lora) {
    const auto A_cat = concat_rows(lora_A);
    const auto grad_A_cat = dropout_seed ? lora_grad_A_dropout_call(grad_shrink, x2, dropout_p, *dropout_seed)
                                         : at::mm(grad_shrink.t(), x2);
    int64_t offset = 0;
    for (size_t i = 0; i < W.size(); ++i) {
      const auto rows = grad_A_cat.narrow(0, offset, args.ranks[i]);
      // Separate storage per parameter: optimizers may update .grad tensors in place.
      grads.A.push_back(W.size() == 1 ? rows : rows.clone());
      grads.B.push_back(at::mm(g[i].t(), shrink.narrow(1, offset, args.ranks[i])).mul_(scalings[i]));
      offset += args.ranks[i];
    }
  }
  if (need_x) {
    at::Tensor gx;
    for (size_t i = 0; i < W.size(); ++i) {
      auto w = W.materialize(i, x.scalar_type(), x.device());
      if (i == 0) {
        gx = at::mm(g[0], w);
      } else {
        gx.addmm_(g[i], w);
      }
    }
    const auto A_cat = concat_rows(lora_A);
    if (dropout_seed) {
      call_grad_x_dropout_accum(gx, grad_shrink, A_cat, dropout_p, *dropout_seed);
    } else {
      gx.addmm_(grad_shrink, A_cat);
    }
    grads.x = gx.view(x.sizes());
  } else {
    grads.x = at::empty({0}, x.options());
  }
  if (need_w) {
    TORCH_CHECK(!W.quantized(), kOp, "_backward: quantized weights are frozen and have no gradient");
    for (size_t i = 0; i < W.size(); ++i) grads.weights.push_back(at::mm(g[i].t(), x2));
  }
  if (need_b) {
    for (size_t i = 0; i < W.size(); ++i) grads.biases.push_back(g[i].sum(0));
  }
  return grads;
}

// ---- op entry points ----------------------------------------------------------------------------

std::tuple<std::vector<at::Tensor>, at::Tensor> lora_linear(
    const at::Tensor& x, c10::string_view weight_format, const OptTensorList& weight_tensors,
    at::IntArrayRef weight_ints, const OptTensorList& biases, at::TensorList lora_A, at::TensorList lora_B,
    at::ArrayRef<double> scalings, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  const auto W = parse_frozen_weights(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  return lora_forward(x, W, biases, lora_A, lora_B, scalings, dropout_p, seed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward(at::TensorList grad_outs, const at::Tensor& x, const at::Tensor& shrink,
                     c10::string_view weight_format, const OptTensorList& weight_tensors, at::IntArrayRef weight_ints,
                     at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings, double dropout_p,
                     const c10::optional<at::Tensor>& seed, const c10::List<bool>& output_mask) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(output_mask.size() == 4, kOp, "_backward: output_mask must have 4 entries, got ", output_mask.size());
  const auto W = parse_frozen_weights(weight_format, weight_tensors, weight_ints, x, x.size(-1), kOp);
  auto g = lora_backward(grad_outs, x, shrink, W, lora_A, lora_B, scalings, dropout_p, seed,
                         {output_mask[0], output_mask[1], output_mask[2], output_mask[3]});
  return {g.x, g.A, g.B, g.weights, g.biases};
}

}  // namespace

// One device-generic body: the GEMMs go to ATen, dequantization and the dropout-fused pieces
// through the dispatcher to each device's kernels.
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

}  // namespace fastpeft
