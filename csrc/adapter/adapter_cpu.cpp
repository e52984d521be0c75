// CPU kernels of the bottleneck adapter: the down-projection epilogue and the activation backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "adapter/adapter.h"
#include "adapter/adapter_activation.h"

namespace fastpeft {

void adapter_down_epilogue_cpu(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                               AdapterActivation act) {
  const int64_t M = z.size(0), r = z.size(1), r_pad = a_aug.size(1);
  const int64_t* ids = banks.ids_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_down_epilogue_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* ap = a_aug.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(r_pad, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* b = bp ? bp + (ids ? ids[m / banks.rows_per_example] : 0) * r : nullptr;
        scalar_t* zr = zp + m * r;
        scalar_t* ar = ap + m * r_pad;
        for (int64_t k = 0; k < r; ++k) {
          if (b) zr[k] = static_cast<scalar_t>(static_cast<float>(zr[k]) + static_cast<float>(b[k]));
          ar[k] = static_cast<scalar_t>(adapter_act(static_cast<float>(zr[k]), act));
        }
        ar[r] = scalar_t(1);
        for (int64_t k = r + 1; k < r_pad; ++k) ar[k] = scalar_t(0);
      }
    });
  });
}

void adapter_activation_backward_cpu(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_activation_backward_cpu", [&] {
    scalar_t* gp = grad_a.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        gp[i] = static_cast<scalar_t>(scale * static_cast<float>(gp[i]) * adapter_act_grad(static_cast<float>(zp[i]), act));
    });
  });
}

}  // namespace fastpeft
