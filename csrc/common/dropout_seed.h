// The dropout mask of an op call, from the op's seed argument (an int64 tensor of one element):
// shared by every family with dropout fused into its kernels (LoRA, multi-LoRA).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/dropout_mask.h"

namespace fastpeft {

// Validates p in [0, 1) and the seed (naming `op`), and builds the mask. Reads the seed on the host.
DropoutMask dropout_mask_from(double p, const at::Tensor& seed, const char* op);

}  // namespace fastpeft
