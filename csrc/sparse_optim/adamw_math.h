// The AdamW update of one trained entry, shared by the CPU and CUDA kernels so that both apply
// exactly the same sequence of float32 operations.
//
// The order of operations follows torch.optim.AdamW's single-tensor path (the default on CPU):
//   param      *= 1 - lr * weight_decay
//   exp_avg     = lerp(exp_avg, grad, 1 - beta1)
//   exp_avg_sq  = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
//   denom       = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
//   param      += -(lr / (1 - beta1^step)) * exp_avg / denom
// with the per-step scalars computed in double and rounded to float once, as torch does when it
// passes Python floats to float32 kernels. The CPU build (-ffp-contract=off) rounds after every
// operation, like fastpeft's PyTorch reference; torch's own vectorised kernels and nvcc may fuse a
// multiply-add, so agreement with torch.optim.AdamW is to float32 rounding, not bit for bit.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fastpeft {

struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// The scalars of one step of one tensor (they depend on that tensor's step count).
struct AdamWScalars {
  float lerp_weight;            // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float decay;                  // 1 - lr * weight_decay
  float neg_step_size;          // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
};

C10_HOST_DEVICE inline AdamWScalars adamw_scalars(const AdamWHyper& h, double step) {
  AdamWScalars s;
  s.lerp_weight = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.neg_step_size = static_cast<float>(-(h.lr / (1.0 - ::pow(h.beta1, step))));
  s.bias_correction2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(h.beta2, step)));
  s.eps = static_cast<float>(h.eps);
  return s;
}

// `grad` is already unscaled (AMP) and in float32; param and the moments are updated in place.
C10_HOST_DEVICE inline void adamw_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                         const AdamWScalars& s) {
  param = param * s.decay;  // exact when weight_decay == 0 (decay == 1)
  // torch.lerp's two-sided formula keeps the result exact at both ends of the weight range.
  // Both sides are computed and one is selected: no branch, so CPU loops vectorise.
  const float diff = grad - exp_avg;
  const float from_start = exp_avg + s.lerp_weight * diff;
  const float from_end = grad - diff * (1.0f - s.lerp_weight);
  exp_avg = s.lerp_weight < 0.5f ? from_start : from_end;
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * grad * grad;
  const float denom = ::sqrtf(exp_avg_sq) / s.bias_correction2_sqrt + s.eps;
  param = param + s.neg_step_size * exp_avg / denom;
}

}  // namespace fastpeft
