// The learnable rational activation of adaptable adapters (Moosavi et al. 2022), as the rational
// activations library's "version A" of Padé activation units (Molina et al. 2020), degrees (5, 4):
//
//   R(z) = P(z) / Q(z),  P(z) = a0 + a1 z + ... + a5 z^5,  Q(z) = 1 + |b1 z| + |b2 z^2| + |b3 z^3| + |b4 z^4|
//
// Q >= 1, so R has no poles. One coefficient row per adapter of a bank: c[0..5] = a0..a5,
// c[6..9] = b1..b4 (kRationalCoeffs = 10). Shared by the CPU loop and the CUDA kernels; acc_t is
// float (the op takes float32, float16 and bfloat16 tensors).
//
// Derivatives (sign(0) = 0, as torch.abs's gradient):
//   dR/dz   = (P' - R Q') / Q,  Q' = sum_j j b_j z^(j-1) sign(b_j z^j)
//   dR/da_i = z^i / Q
//   dR/db_j = -(R / Q) sign(b_j z^j) z^j
#pragma once

#include <c10/macros/Macros.h>

namespace fastpeft {

constexpr int kRationalNumerator = 6;    // a0 .. a5
constexpr int kRationalDenominator = 4;  // b1 .. b4
constexpr int kRationalCoeffs = kRationalNumerator + kRationalDenominator;

template <typename acc_t>
C10_HOST_DEVICE inline acc_t rational_sign(acc_t v) {
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t rational_abs(acc_t v) {
  return v < acc_t(0) ? -v : v;
}

// R(z) for one coefficient row c[kRationalCoeffs].
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rational_value(acc_t z, const acc_t* c) {
  const acc_t p = ((((c[5] * z + c[4]) * z + c[3]) * z + c[2]) * z + c[1]) * z + c[0];
  const acc_t z2 = z * z;
  const acc_t q = acc_t(1) + rational_abs(c[6] * z) + rational_abs(c[7] * z2) + rational_abs(c[8] * z2 * z) +
                  rational_abs(c[9] * z2 * z2);
  return p / q;
}

// Backward of one element: returns g * dR/dz and adds g * dR/dc_k to grad_c[k] (k < 10).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rational_backward(acc_t z, acc_t g, const acc_t* c, acc_t* grad_c) {
  const acc_t zp[5] = {acc_t(1), z, z * z, z * z * z, z * z * z * z};
  const acc_t p = ((((c[5] * z + c[4]) * z + c[3]) * z + c[2]) * z + c[1]) * z + c[0];
  const acc_t dp = (((acc_t(5) * c[5] * z + acc_t(4) * c[4]) * z + acc_t(3) * c[3]) * z + acc_t(2) * c[2]) * z + c[1];
  acc_t q = acc_t(1), dq = acc_t(0), s[4];
#pragma unroll
  for (int j = 0; j < kRationalDenominator; ++j) {
    const acc_t t = c[6 + j] * zp[j + 1];
    s[j] = rational_sign(t);
    q += rational_abs(t);
    dq += s[j] * acc_t(j + 1) * c[6 + j] * zp[j];
  }
  const acc_t inv_q = acc_t(1) / q;
  const acc_t r = p * inv_q;
  const acc_t g_over_q = g * inv_q;
#pragma unroll
  for (int i = 0; i < 5; ++i) grad_c[i] += g_over_q * zp[i];
  grad_c[5] += g_over_q * zp[4] * z;
#pragma unroll
  for (int j = 0; j < kRationalDenominator; ++j) grad_c[6 + j] -= g_over_q * r * s[j] * zp[j + 1];
  return g_over_q * (dp - r * dq);
}

}  // namespace fastpeft
