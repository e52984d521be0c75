// CUDA bodies of the dropout-fused LoRA pieces: the GEMMs run in cuBLAS (tensor cores), fastpeft's
// part is the dropout mask, regenerated from (seed, element index) by dropout_apply_cuda into a
// transient [M, K] buffer that lives only for the call (it is never saved for backward):
//
//   shrink   = dropout(x) A^T                       dropout pass, then one GEMM
//   grad_A   = grad_shrink^T dropout(x)             dropout pass, then one GEMM
//   grad_x  += mask * (grad_shrink A)               one GEMM, then one masked-add pass
//
// Issue 16's review found the previous hand-written kernel (scalar fp32 FMA, a 64-wide tile padded
// from rank 16) at ~10-15% of HBM bandwidth, slower than applying dropout and calling cuBLAS; the
// design rule is vendor GEMMs unless a fused tensor-core kernel is measured faster on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "dropout/dropout.h"
#include "lora/lora.h"

namespace fastpeft {
namespace {

at::Tensor dropped(const at::Tensor& x, const DropoutMask& mask) {
  auto out = at::empty_like(x);  // x is contiguous [M, K]: element index m * K + k, as the CPU path
  dropout_apply_cuda(x, out, mask, /*accumulate=*/false);
  return out;
}

}  // namespace

at::Tensor lora_shrink_dropout_cuda(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return at::mm(dropped(x, mask), lora_A.t());
}

at::Tensor lora_grad_A_dropout_cuda(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return at::mm(grad_shrink.t(), dropped(x, mask));
}

void lora_grad_x_dropout_accum_cuda(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                    const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const auto lora_grad = at::mm(grad_shrink, lora_A);  // [M, K], contiguous like grad_x
  dropout_apply_cuda(lora_grad, grad_x, mask, /*accumulate=*/true);
}

}  // namespace fastpeft
