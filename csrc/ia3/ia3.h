// (IA)^3: learned rescaling of activations, with a bank of task vectors for mixed-task batches
// (rows to tasks: common/task_map.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/task_map.h"

namespace fastpeft {

// Device kernels. x, out: contiguous [M, d] of one float dtype; vectors: contiguous [T, d], float32 or
// x's dtype. out may alias x.
void ia3_scale_cpu(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks);

// The per-task reduction of (IA)^3 backward, in one pass over the [M, d] tensors and without atomics:
//   result[t, j] = sum over rows m of task t of grad[m, j] * saved[m, j]   (saved undefined: of grad)
// divided by vectors[t, j] when divide (saved is then the scaled output y = pre * l, and the sum
// over grad * pre is recovered as sum(grad * y) / l; an entry with l == 0 gets 0).
// When scaled_out is given, also writes scaled_out[m, j] = grad[m, j] * vectors[task(m), j] (may
// alias grad). Returns float32 [T, d].
at::Tensor ia3_task_reduce_cpu(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                               const TaskMap& tasks, bool divide, at::Tensor* scaled_out);
#ifdef FASTPEFT_WITH_CUDA
// The GPU reduction runs in two kernels: float32 partial sums over chunks of at most rows_per_chunk
// rows of one example (enough chunks to fill the GPU even when the batch is one example), then
// one block per (task, column tile) sums the chunks of that task's examples, found through the
// examples sorted by task. Both plain loads and stores: no atomics, deterministic.
struct TaskReducePlan {
  int64_t chunks_per_example = 1;
  int64_t rows_per_chunk = 1;
  at::Tensor perm;     // int64 [B], examples sorted by task (stable); undefined for one task
  at::Tensor offsets;  // int64 [T + 1], task t owns perm[offsets[t] .. offsets[t + 1])
  at::Tensor partial;  // float32 [B * chunks_per_example, d]
  at::Tensor result;   // float32 [T, d]
};
void ia3_scale_cuda(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks);
void ia3_task_reduce_cuda(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                          const TaskMap& tasks, bool divide, at::Tensor* scaled_out, const TaskReducePlan& plan);
#endif

// Device-generic entry points used by the composite ops (they pick the kernel by x's device).
void ia3_scale_into(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks);
at::Tensor ia3_task_reduce(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                           const TaskMap& tasks, bool divide, at::Tensor* scaled_out);

}  // namespace fastpeft
