// CPU kernel of dropout_apply / dropout_apply_add_.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/dropout_elementwise_cpu.h"
#include "dropout/dropout.h"

namespace fastpeft {

void dropout_apply_cpu(const at::Tensor& x, at::Tensor& out, const DropoutMask& mask, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_cpu", [&] {
    if (accumulate) {
      accumulate_dropout(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.numel(), 0, mask);
    } else {
      apply_dropout(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), 0, mask);
    }
  });
}

}  // namespace fastpeft
