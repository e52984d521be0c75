// Counter-based dropout mask: element `index` of a row-major [M, K] tensor is kept or dropped by
// a hash of (seed, index) alone. The same bits come out on CPU, CUDA and in the PyTorch reference
// (fastpeft/ops/dropout.py), so backward regenerates the forward mask instead of storing an M x K
// mask, and tests compare kernels against the reference exactly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPEFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTPEFT_HOST_DEVICE inline
#endif

namespace fastpeft {

// A 32-bit integer finaliser with full avalanche (C. Wellons' "lowbias32").
FASTPEFT_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutMask {
  uint32_t key_lo;     // derived from the seed's low word
  uint32_t seed_hi;    // the seed's high word
  uint32_t threshold;  // keep iff (hash >> 8) >= threshold, i.e. P(keep) = 1 - p on 24 bits
  float scale;         // 1 / (1 - p), applied to kept elements

  FASTPEFT_HOST_DEVICE bool keep(uint64_t index) const {
    const uint32_t lo = static_cast<uint32_t>(index);
    const uint32_t hi = static_cast<uint32_t>(index >> 32);
    const uint32_t key_hi = mix32(seed_hi ^ mix32(hi + key_lo));
    const uint32_t h = mix32(mix32(lo ^ key_lo) ^ key_hi);
    return (h >> 8) >= threshold;
  }

  // Multiplier for element `index`: 0 if dropped, 1/(1-p) if kept.
  FASTPEFT_HOST_DEVICE float factor(uint64_t index) const { return keep(index) ? scale : 0.0f; }
};

inline DropoutMask make_dropout_mask(double p, int64_t seed) {
  DropoutMask m;
  const uint64_t s = static_cast<uint64_t>(seed);
  m.key_lo = mix32(static_cast<uint32_t>(s) + 0x9e3779b9U);
  m.seed_hi = static_cast<uint32_t>(s >> 32);
  m.threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));
  m.scale = static_cast<float>(1.0 / (1.0 - p));
  return m;
}

}  // namespace fastpeft
