// Op bodies of dropout_apply / dropout_apply_add_: validate, then run the device kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dropout_seed.h"
#include "dropout/dropout.h"

namespace fastpeft {
namespace {

constexpr const char* kApplyOp = "fastpeft.dropout_apply";
constexpr const char* kAddOp = "fastpeft.dropout_apply_add_";

using Kernel = void (*)(const at::Tensor&, at::Tensor&, const DropoutMask&, bool);

template <Kernel K>
at::Tensor dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_float(x, kApplyOp, "x");
  const auto mask = dropout_mask_from(p, seed, kApplyOp);
  const auto src = x.contiguous();
  auto out = at::empty_like(src);
  K(src, out, mask, /*accumulate=*/false);
  return out;
}

template <Kernel K>
void dropout_apply_add_(at::Tensor& out, const at::Tensor& x, double p, const at::Tensor& seed) {
  check_float(out, kAddOp, "out");
  check_float(x, kAddOp, "x");
  check_dtype(x, out.scalar_type(), kAddOp, "x", " (the dtype of out)");
  check_same_device(x, out, kAddOp, "x", "out");
  TORCH_CHECK(x.sizes() == out.sizes(), kAddOp, ": x must have out's shape ", out.sizes(), ", got ", x.sizes());
  TORCH_CHECK(out.is_contiguous(), kAddOp, ": out must be contiguous (it is updated in place)");
  const auto mask = dropout_mask_from(p, seed, kAddOp);
  K(x.contiguous(), out, mask, /*accumulate=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("dropout_apply", &dropout_apply<dropout_apply_cpu>);
  m.impl("dropout_apply_add_", &dropout_apply_add_<dropout_apply_cpu>);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("dropout_apply", &dropout_apply<dropout_apply_cuda>);
  m.impl("dropout_apply_add_", &dropout_apply_add_<dropout_apply_cuda>);
}
#endif

}  // namespace fastpeft
