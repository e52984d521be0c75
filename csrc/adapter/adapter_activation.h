// Adapter activations and their derivatives in float32, for the CUDA kernels (the CPU runs ATen's
// vectorised activation kernels, adapter_cpu.cpp). gelu is the exact (erf) form, as transformers'
// "gelu" and torch's default.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "adapter/adapter.h"

namespace fastpeft {

C10_HOST_DEVICE inline float adapter_act(float z, AdapterActivation act) {
  switch (act) {
    case AdapterActivation::ReLU:
      return z > 0.0f ? z : 0.0f;
    case AdapterActivation::GELU:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case AdapterActivation::SiLU:
    default:
      return z / (1.0f + expf(-z));
  }
}

C10_HOST_DEVICE inline float adapter_act_grad(float z, AdapterActivation act) {
  switch (act) {
    case AdapterActivation::ReLU:
      return z > 0.0f ? 1.0f : 0.0f;
    case AdapterActivation::GELU: {
      const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
      const float pdf = expf(-0.5f * z * z) * 0.39894228040143268f;
      return cdf + z * pdf;
    }
    case AdapterActivation::SiLU:
    default: {
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f + z * (1.0f - s));
    }
  }
}

}  // namespace fastpeft
