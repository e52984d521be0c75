// CPU kernels of the bottleneck adapter: the down-projection epilogue and the activation backward.
//
// On the CPU these are ATen's own vectorised elementwise kernels (AVX2 / AVX-512 chosen by ATen at
// load), called on views of the [M, r] tensors: a hand-written scalar loop with libm's erff / expf
// took ~1 ms per stage at 2048 x 48 on two cores, ATen's vectorised GELU ~0.05 ms. The extension is
// built without -mavx2, so a vectorised loop of our own would need per-ISA copies; ATen has them.
#include <ATen/ATen.h>

#include "adapter/adapter.h"

namespace fastpeft {

namespace {

void activation_out(at::Tensor out, const at::Tensor& z, AdapterActivation act) {
  switch (act) {
    case AdapterActivation::ReLU:
      at::threshold_out(out, z, 0, 0);
      return;
    case AdapterActivation::GELU:
      // Not gelu_out into the strided view: torch 2.11's CPU gelu.out writes garbage into a
      // non-contiguous out (tests/ops/test_adapter.py checks the epilogue against F.gelu).
      out.copy_(at::gelu(z, "none"));
      return;
    case AdapterActivation::SiLU:
    default:
      at::silu_out(out, z);
      return;
  }
}

}  // namespace

void adapter_down_epilogue_cpu(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                               AdapterActivation act) {
  const int64_t r = z.size(1), r_pad = a_aug.size(1);
  if (bias.defined()) {
    if (banks.single()) {
      z.add_(bias[0]);
    } else {  // each example's bias row, broadcast over its rows
      z.view({banks.num_examples, banks.rows_per_example, r}).add_(at::embedding(bias, banks.ids).unsqueeze(1));
    }
  }
  activation_out(a_aug.narrow(1, 0, r), z, act);
  a_aug.narrow(1, r, 1).fill_(1);
  if (r_pad > r + 1) a_aug.narrow(1, r + 1, r_pad - r - 1).zero_();
}

void adapter_activation_backward_cpu(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale) {
  switch (act) {
    case AdapterActivation::ReLU:
      at::threshold_backward_out(grad_a, grad_a, z, 0);
      break;
    case AdapterActivation::GELU:
      at::gelu_backward_out(grad_a, grad_a, z, "none");
      break;
    case AdapterActivation::SiLU:
    default:
      at::silu_backward_out(grad_a, grad_a, z);
      break;
  }
  if (scale != 1.0f) grad_a.mul_(scale);
}

}  // namespace fastpeft
