// Bottleneck adapters (Houlsby / Pfeiffer): h + scaling * (act(LN(h) Wd^T + bd) Wu^T + bu).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/task_map.h"  // the per-example adapter index: the same row -> bank entry map as (IA)^3

namespace fastpeft {

// Rational: the learnable rational activation of adaptable adapters (adapter/adapter_rational.h),
// with one coefficient row [10] per adapter of a bank.
enum class AdapterActivation : int { ReLU = 0, GELU = 1, SiLU = 2, Rational = 3 };

AdapterActivation parse_adapter_activation(const std::string& name, const char* op);

// Down-projection epilogue, one pass over the [M, r] GEMM output:
//   z[m, k] += bias[bank(m), k]              (skipped when bias is undefined)
//   a_aug[m, k] = act(z[m, k]) for k < r,  a_aug[m, r] = 1,  a_aug[m, k > r] = 0
// a_aug [M, r_pad] is the up-projection's input with a column of ones, so one GEMM against
// [Wu | bu | 0] adds the up bias too, and r_pad (a multiple of 8) keeps tensor-core alignment.
// z, a_aug contiguous, x's dtype; bias [N, r] contiguous.
void adapter_down_epilogue_cpu(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                               AdapterActivation act);
// dz = scale * grad_a * act'(z), written over grad_a ([M, r] contiguous, x's dtype). The CUDA kernel
// does float32 math with one rounding; the CPU runs ATen's vectorised activation backward (and a
// multiply when scale != 1: the op folds its scaling into the GEMM that makes grad_a and passes 1).
void adapter_activation_backward_cpu(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale);

// The rational activation (coeffs [N, 10] contiguous, x's dtype; row m uses entry bank(m)):
// forward writes out[m, k] = R(z[m, k]) into out, a view with unit column stride (a_aug's first r
// columns); backward writes dz = grad_a * R'(z) over grad_a and returns the coefficient gradients
// summed over each row, [M, 10] float32 (the op takes float32 / float16 / bfloat16 tensors),
// for a deterministic per-bank reduction by the caller.
void adapter_rational_forward_cpu(const at::Tensor& z, const at::Tensor& coeffs, const TaskMap& banks,
                                  at::Tensor out);
at::Tensor adapter_rational_backward_cpu(at::Tensor& grad_a, const at::Tensor& z, const at::Tensor& coeffs,
                                         const TaskMap& banks);
#ifdef FASTPEFT_WITH_CUDA
// coeffs: the rational coefficients (act == Rational), else undefined.
void adapter_down_epilogue_cuda(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                                AdapterActivation act, const at::Tensor& coeffs);
void adapter_activation_backward_cuda(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale);
at::Tensor adapter_rational_backward_cuda(at::Tensor& grad_a, const at::Tensor& z, const at::Tensor& coeffs,
                                          const TaskMap& banks);
#endif

}  // namespace fastpeft
