// Rows to bank entries: which (IA)^3 task vector or which bottleneck adapter of a bank each row of
// an activation uses, from a per-example index.
//
// An activation x [B, ..., d] is M = numel / d rows of length d; example b owns the
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

}  // namespace fastpeft
