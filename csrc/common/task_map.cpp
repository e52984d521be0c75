// Rows to bank entries (see task_map.h): validation of the bank and the per-example index.
#include "common/task_map.h"

#include <ATen/ATen.h>

#include "common/checks.h"

namespace fastpeft {

TaskMap make_task_map(const at::Tensor& x, int64_t d, const at::Tensor& vectors,
                      const c10::optional<at::Tensor>& task_ids, const char* op) {
  constexpr const char* vectors_name = "vectors";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., features]");
  check_float(vectors, op, vectors_name);
  TORCH_CHECK(vectors.scalar_type() == at::kFloat || vectors.scalar_type() == x.scalar_type(), op, ": ",
              vectors_name, " must be float32 or the dtype of x (", x.scalar_type(), "), got ",
              vectors.scalar_type());
  check_same_device(vectors, x, op, vectors_name, "x");
  TORCH_CHECK(vectors.dim() == 2 && vectors.size(1) == d, op, ": ", vectors_name, " must be [num_tasks, ", d,
              "] (one vector of ", d, " features per task), got ", vectors.sizes());
  return make_task_map_from_ids(x, vectors.size(0), task_ids, op, "task_ids", "vectors");
}

TaskMap make_task_map_from_ids(const at::Tensor& x, int64_t num_tasks, const c10::optional<at::Tensor>& task_ids,
                               const char* op, const char* ids_name, const char* bank_name) {
  TaskMap map;
  map.num_tasks = num_tasks;
  TORCH_CHECK(map.num_tasks >= 1, op, ": ", bank_name, " must hold at least one entry");
  const int64_t rows = x.size(-1) == 0 ? 0 : x.numel() / x.size(-1);
  const bool has_ids = task_ids.has_value() && task_ids->defined();
  if (!has_ids) {
    TORCH_CHECK(map.num_tasks == 1, op, ": ", bank_name, " holds ", map.num_tasks, " entries, so ", ids_name,
                " ([batch] index per example) is required");
    map.num_examples = 1;
    map.rows_per_example = rows;
    return map;
  }
  const auto& ids = *task_ids;
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op, ": ", ids_name,
              " must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1, op, ": ", ids_name, " must be 1-D [batch], got shape ", ids.sizes());
  TORCH_CHECK(ids.device() == x.device() || ids.device().is_cpu(), op, ": ", ids_name, " is on ", ids.device(),
              " but x is on ", x.device(), "; pass them on x's device or on the CPU");
  TORCH_CHECK(x.dim() >= 2 && x.size(0) == ids.size(0), op, ": ", ids_name, " has ", ids.size(0),
              " entries but x's first (batch) dimension is ", x.dim() >= 2 ? x.size(0) : -1,
              "; x must be [batch, ..., features] with one index per example");
  map.num_examples = ids.size(0);
  map.rows_per_example = map.num_examples == 0 ? 0 : rows / map.num_examples;
  auto ids64 = ids.to(at::kLong).contiguous();
  if (ids64.device().is_cpu() && ids64.numel() > 0) {
    const int64_t* p = ids64.data_ptr<int64_t>();
    for (int64_t b = 0; b < ids64.numel(); ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] < map.num_tasks, op, ": ", ids_name, "[", b, "] = ", p[b],
                  " is out of range for ", map.num_tasks, " entries of ", bank_name, " (valid: 0 .. ",
                  map.num_tasks - 1, ")");
    }
  }
  map.ids = ids64.to(x.device());
  return map;
}

}  // namespace fastpeft
