// CPU kernel of the fused linear cross-entropy: one row per task, float32 math, two passes over
// the row (online max / sum of exp, then the gradient written over the logits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "linear_cross_entropy/linear_cross_entropy.h"

namespace fastpeft {

namespace {

template <typename scalar_t>
void rows(scalar_t* logits, const int64_t* labels, float* loss, int64_t C, int64_t V, const CrossEntropyRows& p) {
  const float cap = static_cast<float>(p.softcap), inv_cap = cap > 0 ? 1.0f / cap : 0.0f;
  const float scale = static_cast<float>(p.grad_scale);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* x = logits + i * V;
      const int64_t label = labels[i];
      if (label == p.ignore_index) {
        loss[i] = 0.0f;
        for (int64_t j = 0; j < V; ++j) x[j] = scalar_t(0);
        continue;
      }
      if (cap <= 0 && std::is_same<scalar_t, float>::value) {
        // Without soft-capping, in float32: exp once per element. Pass 1 the row max, pass 2 the
        // exponentials (stored over the row) and their sum, pass 3 one multiply per element.
        float* xf = reinterpret_cast<float*>(x);
        const float x_label = xf[label];
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < V; ++j) m = std::max(m, xf[j]);
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) {
          const float e = std::exp(xf[j] - m);
          xf[j] = e;
          s += e;
        }
        loss[i] = m + std::log(s) - x_label;
        const float k = scale / s;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) xf[j] *= k;
        xf[label] -= scale;
        continue;
      }
      auto z_of = [&](int64_t j) {
        const float v = static_cast<float>(x[j]);
        return cap > 0 ? cap * std::tanh(v * inv_cap) : v;
      };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < V; ++j) m = std::max(m, z_of(j));
      float s = 0.0f;
      for (int64_t j = 0; j < V; ++j) s += std::exp(z_of(j) - m);
      const float lse = m + std::log(s);
      loss[i] = lse - z_of(label);
      for (int64_t j = 0; j < V; ++j) {
        const float v = static_cast<float>(x[j]);
        const float t = cap > 0 ? std::tanh(v * inv_cap) : 0.0f;
        const float z = cap > 0 ? cap * t : v;
        float g = std::exp(z - lse) - (j == label ? 1.0f : 0.0f);
        if (cap > 0) g *= 1.0f - t * t;
        x[j] = static_cast<scalar_t>(g * scale);
      }
    }
  });
}

}  // namespace

void cross_entropy_rows_cpu(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, const CrossEntropyRows& p) {
  const int64_t C = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows_cpu", [&] {
    rows<scalar_t>(logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), loss.data_ptr<float>(), C, V, p);
  });
}

}  // namespace fastpeft
