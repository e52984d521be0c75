// Bottleneck adapters (Houlsby / Pfeiffer): h + scaling * (act(LN(h) Wd^T + bd) Wu^T + bu).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/task_map.h"  // the per-example adapter index: the same row -> bank entry map as (IA)^3

namespace fastpeft {

enum class AdapterActivation : int { ReLU = 0, GELU = 1, SiLU = 2 };

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
#ifdef FASTPEFT_WITH_CUDA
void adapter_down_epilogue_cuda(at::Tensor& z, const at::Tensor& bias, const TaskMap& banks, at::Tensor& a_aug,
                                AdapterActivation act);
void adapter_activation_backward_cuda(at::Tensor& grad_a, const at::Tensor& z, AdapterActivation act, float scale);
#endif

}  // namespace fastpeft
