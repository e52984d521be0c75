// Pieces shared by the C++ autograd kernels (csrc/<family>/<family>_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/frozen_weights.h"

namespace fastpeft {

// The names every <family>_autograd.cpp uses.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using GradTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The frozen-weight argument triple of a linear op (see common/frozen_weights.h) as an autograd
// function carries it: one non-differentiable value.
//
// Quantized weights, and the dense weights of (IA)^3 and sparse deltas (always frozen), are module
// state: kept by reference in saved_data (never as autograd-saved activations, so saved-tensor
// hooks such as activation offloading do not copy them) and never saved dequantized
// (save_by_reference / load_by_reference).
//
// LoRA and multi-LoRA give a trainable dense base its gradient, so there a dense weight is an
// autograd input: take_dense_inputs moves it out of this value into a TensorList passed beside
// it, and save / load keep it with save_for_backward.
struct FrozenWeightArg {
  std::string format;
  OptTensorList tensors;
  std::vector<int64_t> ints;

  static FrozenWeightArg of(c10::string_view format, const OptTensorList& tensors, at::IntArrayRef ints) {
    return {std::string(format), tensors, ints.vec()};
  }

  bool is_dense() const { return format == "dense"; }

  // Refuses a weight tensor that requires grad (ops whose base gets no gradient).
  void check_frozen(const char* op) const {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const c10::optional<at::Tensor> t = tensors[i];
      TORCH_CHECK(!t.has_value() || !t->defined() || !t->requires_grad(), op,
                  ": the base weight is frozen and gets no gradient (weight_tensors[", i,
                  "] requires grad); call .requires_grad_(False) on it (or detach it) first");
    }
  }

  void save_by_reference(torch::autograd::AutogradContext* ctx) const {
    auto& d = ctx->saved_data;
    d["weight_format"] = format;
    d["weight_tensors"] = tensors;
    d["weight_ints"] = ints;
  }

  static FrozenWeightArg load_by_reference(torch::autograd::AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["weight_format"].toStringRef(), d["weight_tensors"].toOptionalTensorList(), d["weight_ints"].toIntVector()};
  }

  // ---- dense weights as autograd inputs (LoRA, multi-LoRA) ----

  // Moves the dense weights out (they become autograd inputs); nothing for a quantized weight.
  std::vector<at::Tensor> take_dense_inputs(const char* op) {
    std::vector<at::Tensor> out;
    if (!is_dense()) return out;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const c10::optional<at::Tensor> t = tensors[i];
      TORCH_CHECK(t.has_value() && t->defined(), op, ": weight_tensors[", i, "] (a dense weight) is required, got None");
      out.push_back(*t);
    }
    tensors = OptTensorList();
    return out;
  }

  // The op's weight_tensors again, given the dense inputs.
  OptTensorList op_tensors(at::TensorList dense) const {
    if (!is_dense()) return tensors;
    OptTensorList out;
    for (const auto& t : dense) out.push_back(t);
    return out;
  }

  // Dense inputs are appended to `to_save` (for save_for_backward), quantized tensors kept by reference.
  void save(torch::autograd::AutogradContext* ctx, at::TensorList dense, torch::autograd::variable_list& to_save) const {
    save_by_reference(ctx);
    ctx->saved_data["weight_count"] = static_cast<int64_t>(dense.size());
    to_save.insert(to_save.end(), dense.begin(), dense.end());
  }

  // The weight in backward; dense weights are read from the saved variables starting at `first`.
  static FrozenWeightArg load(torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& saved,
                              size_t first) {
    auto w = load_by_reference(ctx);
    if (w.is_dense()) {
      // A new list: the loaded one shares its storage with saved_data, which a second backward
      // (retain_graph=True) reads again.
      w.tensors = OptTensorList();
      const auto n = static_cast<size_t>(ctx->saved_data["weight_count"].toInt());
      for (size_t i = 0; i < n; ++i) w.tensors.push_back(saved[first + i]);
    }
    return w;
  }
};

// Autograd inputs must be defined tensors, so optional biases travel as the list of those present
// plus one flag per projection.
struct SplitBiases {
  std::vector<at::Tensor> present;
  std::vector<bool> has;

  static SplitBiases of(const OptTensorList& biases) {
    SplitBiases b;
    for (size_t i = 0; i < biases.size(); ++i) {
      const c10::optional<at::Tensor> t = biases[i];
      const bool has = t.has_value() && t->defined();
      b.has.push_back(has);
      if (has) b.present.push_back(*t);
    }
    return b;
  }

  static OptTensorList join(at::TensorList present, const std::vector<bool>& has) {
    OptTensorList out;
    size_t next = 0;
    for (bool h : has) out.push_back(h ? c10::optional<at::Tensor>(present[next++]) : c10::nullopt);
    return out;
  }
};

// The gradient of an output [..., out_features] computed from x [..., K]; an output no loss
// reached comes to backward as an undefined tensor: zeros of its shape, as Python autograd gives.
inline at::Tensor grad_or_zeros(const at::Tensor& grad, const at::Tensor& x, int64_t out_features) {
  if (grad.defined()) return grad;
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return at::zeros(shape, x.options());
}

inline c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

}  // namespace fastpeft
