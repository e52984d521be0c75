// Dropout under the counter-based mask (common/dropout_mask.h), materialised: for the few places
// where a vendor GEMM needs the dropped tensor itself (DoRA's base product of dropout(x)). The
// result is a transient buffer; backward regenerates the mask from the seed, nothing is saved.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/dropout_mask.h"

namespace fastpeft {

// out = (accumulate ? out : 0) + x * factor(i) over the row-major elements i of x; float32 math,
// rounded once. x and out contiguous, same shape and dtype (validated by csrc/dropout/dropout.cpp).
void dropout_apply_cpu(const at::Tensor& x, at::Tensor& out, const DropoutMask& mask, bool accumulate);
#ifdef FASTPEFT_WITH_CUDA
void dropout_apply_cuda(const at::Tensor& x, at::Tensor& out, const DropoutMask& mask, bool accumulate);
#endif

}  // namespace fastpeft
