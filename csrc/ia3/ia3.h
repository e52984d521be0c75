// (IA)^3: learned rescaling of activations, with a bank of task vectors for mixed-task batches.
//
// Rows and tasks: an activation x [B, ..., d] is M = numel / d rows of length d; example b owns the
// rows_per_example = M / B consecutive rows b * rows_per_example .. and is scaled by
// vectors[task_ids[b]]. Without task_ids there is one task (vectors is [1, d]) for every row.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastpeft {

struct TaskMap {
  at::Tensor ids;  // int64 [B], contiguous, on the data's device; undefined when there is one task
  int64_t num_examples = 1;
  int64_t rows_per_example = 0;  // when ids is undefined: every row (one "example")
  int64_t num_tasks = 1;

  bool single() const { return !ids.defined(); }
  const int64_t* ids_ptr() const { return ids.defined() ? ids.data_ptr<int64_t>() : nullptr; }
};

// Validates vectors [T, d] (float32 or x's dtype) and task_ids [B] (int32/int64, on x's device or
// the CPU) against the rows of x [B, ..., K] (d is K, or the out_features of a linear whose input is
// x); names the bad argument. task_ids on the CPU are range-checked
// here and copied to x's device; on a GPU the kernels check them with a device-side assert (a
// host check would synchronise every call).
TaskMap make_task_map(const at::Tensor& x, int64_t d, const at::Tensor& vectors,
                      const c10::optional<at::Tensor>& task_ids, const char* op);

// The row-to-bank map alone: num_tasks entries in a bank, ids named `ids_name` in messages (the
// bottleneck adapters use it for their per-example adapter index).
TaskMap make_task_map_from_ids(const at::Tensor& x, int64_t num_tasks, const c10::optional<at::Tensor>& task_ids,
                               const char* op, const char* ids_name, const char* bank_name);

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
