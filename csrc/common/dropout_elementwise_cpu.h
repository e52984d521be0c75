// The counter-based dropout mask (common/dropout_mask.h) applied element-wise on the CPU, shared by
// the dropout-fused LoRA kernels (csrc/lora/lora_cpu.cpp) and the dropout_apply ops (csrc/dropout).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "common/dropout_mask.h"

namespace fastpeft {

// dst[i] = src[i] * factor(base + i), float32 math rounded once to T.
template <typename T>
void apply_dropout(const T* src, T* dst, int64_t n, uint64_t base, const DropoutMask& mask) {
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * mask.factor(base + i));
  });
}

// acc[i] += src[i] * factor(base + i), float32 math rounded once to T.
template <typename T>
void accumulate_dropout(T* acc, const T* src, int64_t n, uint64_t base, const DropoutMask& mask) {
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      acc[i] = static_cast<T>(static_cast<float>(acc[i]) + static_cast<float>(src[i]) * mask.factor(base + i));
  });
}

}  // namespace fastpeft
