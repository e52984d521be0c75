// The dropout mask of an op call, from its seed argument (see dropout_seed.h).
#include "common/dropout_seed.h"

#include <ATen/ATen.h>

namespace fastpeft {

DropoutMask dropout_mask_from(double p, const at::Tensor& seed, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.defined() && seed.numel() == 1 && seed.scalar_type() == at::kLong, op,
              ": seed must be an int64 tensor with one element, got ",
              seed.defined() ? toString(seed.scalar_type()) : "None", " of shape ",
              seed.defined() ? seed.sizes() : at::IntArrayRef{});
  return make_dropout_mask(p, seed.item<int64_t>());
}

c10::optional<at::Tensor> seed_if_dropout(double p, const c10::optional<at::Tensor>& seed, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(p == 0.0 || (seed.has_value() && seed->defined()), op,
              ": dropout_p > 0 needs a seed (an int64 tensor with one element)");
  return p == 0.0 ? c10::nullopt : seed;
}

}  // namespace fastpeft
