// The dropout mask of an op call, from the op's seed argument (an int64 tensor of one element):
// shared by every family with dropout fused into its kernels (LoRA, multi-LoRA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/dropout_mask.h"

namespace fastpeft {

// Validates p in [0, 1) and the seed (naming `op`), and builds the mask. Reads the seed on the host.
DropoutMask dropout_mask_from(double p, const at::Tensor& seed, const char* op);

// The seed when dropout is on (p > 0), else nullopt; checks p in [0, 1) and that p > 0 comes with a
// seed (naming `op`). For composite ops that pass the seed on to the dropout kernels.
c10::optional<at::Tensor> seed_if_dropout(double p, const c10::optional<at::Tensor>& seed, const char* op);

}  // namespace fastpeft
