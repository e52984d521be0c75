// masked_weight_linear: y = x W^T + b whose weight gradient exists only at a sparse mask (FishMask
// training), one composite body for every device.
//
// Forward is at::linear. Backward computes grad_x = grad_out W and grad_bias as usual, and the
// weight gradient at the mask's flat indices only, by the sparse-delta backward's sampled product
// (sparse_delta_weight_grad: an SDDMM over the tokens, or one dense GEMM + gather above its density
// crossover), written into a zero [out, in] tensor: the dense masked gradient, without the dense
// grad_out^T x GEMM the plain layer spends a third of its FLOPs on.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "sparse_delta/sparse_delta.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.masked_weight_linear";

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices) {
  check_float(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension [..., in_features]");
  check_float(weight, kOp, "weight");
  check_dim(weight, 2, kOp, "weight");
  check_dtype(weight, x.scalar_type(), kOp, "weight", " (the dtype of x; cast one, or run under torch.autocast)");
  check_same_device(weight, x, kOp, "weight", "x");
  TORCH_CHECK(x.size(-1) == weight.size(1), kOp, ": x has ", x.size(-1), " features but the weight takes ",
              weight.size(1));
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, kOp,
              ": indices must be int32 or int64 (sorted flat indices into the weight), got ", indices.scalar_type());
  check_dim(indices, 1, kOp, "indices");
  check_same_device(indices, x, kOp, "indices", "x");
  TORCH_CHECK(indices.numel() <= weight.numel(), kOp, ": ", indices.numel(), " indices cannot be unique in a weight of ",
              weight.numel(), " elements");
}

at::Tensor masked_weight_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& indices) {
  check_inputs(x, weight, indices);
  if (bias.has_value() && bias->defined()) {
    check_dtype(*bias, x.scalar_type(), kOp, "bias", " (the dtype of x)");
    check_same_device(*bias, x, kOp, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": bias must be [", weight.size(0),
                "], got ", bias->sizes());
  }
  return at::linear(x, weight, bias);
}

// output_mask: [x, weight, bias]. Outputs that are not asked for are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_weight_linear_backward(const at::Tensor& grad_out,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& indices,
                                                                             const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 3, kOp, "_backward: output_mask must have 3 entries, got ", output_mask.size());
  check_inputs(x, weight, indices);
  check_dtype(grad_out, x.scalar_type(), kOp, "grad_out", " (the dtype of x)");
  const int64_t K = weight.size(1), O = weight.size(0);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(grad_out.numel() == M * O && grad_out.size(-1) == O, kOp, "_backward: grad_out must be [..., ", O,
              "] with ", M, " rows, got ", grad_out.sizes());
  const auto g = grad_out.reshape({M, O});
  at::Tensor grad_x = output_mask[0] ? at::mm(g, weight).view(x.sizes()) : at::empty({0}, x.options());
  at::Tensor grad_weight;
  if (output_mask[1]) {
    const auto idx = indices.contiguous();
    const auto values = call_weight_grad(g, x.reshape({M, K}), idx);  // float32, one per index
    grad_weight = at::zeros({O, K}, weight.options());
    call_sparse_delta_add(grad_weight, idx, values);  // rounded once to the weight's dtype
  } else {
    grad_weight = at::empty({0}, weight.options());
  }
  at::Tensor grad_bias = output_mask[2] ? g.sum(0) : at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("masked_weight_linear", &masked_weight_linear);
  m.impl("masked_weight_linear_backward", &masked_weight_linear_backward);
}

}  // namespace fastpeft
