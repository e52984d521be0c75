// (IA)^3 scaling ops: y = x * vectors[task(row)], in and out of place, and its backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "ia3/ia3.h"

namespace fastpeft {


void ia3_scale_into(const at::Tensor& x, at::Tensor& out, const at::Tensor& vectors, const TaskMap& tasks) {
  if (x.numel() == 0) return;
#ifdef FASTPEFT_WITH_CUDA
  if (x.is_cuda()) return ia3_scale_cuda(x, out, vectors, tasks);
#endif
  TORCH_CHECK(x.device().is_cpu(), "fastpeft (IA)^3: no kernel for device ", x.device());
  ia3_scale_cpu(x, out, vectors, tasks);
}

at::Tensor ia3_task_reduce(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& vectors,
                           const TaskMap& tasks, bool divide, at::Tensor* scaled_out) {
  if (grad.numel() == 0 || grad.size(-1) == 0)
    return at::zeros({tasks.num_tasks, grad.size(-1)}, grad.options().dtype(at::kFloat));
#ifdef FASTPEFT_WITH_CUDA
  if (grad.is_cuda()) {
    const int64_t d = grad.size(1);
    TORCH_CHECK(d <= (int64_t(65535) << 5), "fastpeft (IA)^3: rows of more than ", int64_t(65535) << 5,
                " features are not supported on CUDA, got ", d);
    TaskReducePlan plan;
    const int64_t B = tasks.num_examples, S = tasks.rows_per_example;
    // ~1024 chunks of >= 32 rows: enough blocks for the GPU, partial sums small next to [M, d].
    constexpr int64_t kTargetChunks = 1024, kMinRows = 32;
    const int64_t by_rows = std::max<int64_t>(1, (S + kMinRows - 1) / kMinRows);
    const int64_t by_target = std::max<int64_t>(1, (kTargetChunks + B - 1) / B);
    plan.chunks_per_example = std::max<int64_t>(1, std::min(by_rows, by_target));
    plan.rows_per_chunk = std::max<int64_t>(1, (S + plan.chunks_per_example - 1) / plan.chunks_per_example);
    plan.partial = at::empty({B * plan.chunks_per_example, d}, grad.options().dtype(at::kFloat));
    plan.result = at::empty({tasks.num_tasks, d}, grad.options().dtype(at::kFloat));
    if (!tasks.single()) {
      const auto sorted = at::sort(tasks.ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      plan.perm = std::get<1>(sorted).contiguous();
      const auto bounds = at::arange(tasks.num_tasks + 1, tasks.ids.options());
      plan.offsets = at::searchsorted(std::get<0>(sorted), bounds).contiguous();
    }
    ia3_task_reduce_cuda(grad, saved, vectors, tasks, divide, scaled_out, plan);
    return plan.result;
  }
#endif
  TORCH_CHECK(grad.device().is_cpu(), "fastpeft (IA)^3: no kernel for device ", grad.device());
  return ia3_task_reduce_cpu(grad, saved, vectors, tasks, divide, scaled_out);
}

namespace {

constexpr const char* kScaleOp = "fastpeft.ia3_scale";
constexpr const char* kScaleInplaceOp = "fastpeft.ia3_scale_";
constexpr const char* kScaleBackwardOp = "fastpeft.ia3_scale_backward";

at::Tensor rows_of(const at::Tensor& t) {
  const int64_t d = t.size(-1);
  return t.contiguous().view({d == 0 ? 0 : t.numel() / d, d});
}

at::Tensor ia3_scale(const at::Tensor& x, const at::Tensor& vectors, const c10::optional<at::Tensor>& task_ids) {
  const auto tasks = make_task_map(x, x.size(-1), vectors, task_ids, kScaleOp);
  const auto x2 = rows_of(x);
  auto out = at::empty_like(x2);
  ia3_scale_into(x2, out, vectors.contiguous(), tasks);
  return out.view(x.sizes());
}

void ia3_scale_(at::Tensor& x, const at::Tensor& vectors, const c10::optional<at::Tensor>& task_ids) {
  const auto tasks = make_task_map(x, x.size(-1), vectors, task_ids, kScaleInplaceOp);
  TORCH_CHECK(x.is_contiguous(), kScaleInplaceOp, ": x must be contiguous (it is scaled in place)");
  auto x2 = x.view({x.size(-1) == 0 ? 0 : x.numel() / x.size(-1), x.size(-1)});
  ia3_scale_into(x2, x2, vectors.contiguous(), tasks);
}

// grad_x = grad * vectors[task]; grad_vectors[t] = sum over task t's rows of grad * saved
// (/ vectors when saved is the scaled output rather than the input).
std::tuple<at::Tensor, at::Tensor> ia3_scale_backward(const at::Tensor& grad, const at::Tensor& saved,
                                                      const at::Tensor& vectors,
                                                      const c10::optional<at::Tensor>& task_ids,
                                                      bool divide_by_vectors, const c10::List<bool>& output_mask) {
  const auto tasks = make_task_map(saved, saved.size(-1), vectors, task_ids, kScaleBackwardOp);
  TORCH_CHECK(output_mask.size() == 2, kScaleBackwardOp, ": output_mask must have 2 entries, got ",
              output_mask.size());
  check_dtype(grad, saved.scalar_type(), kScaleBackwardOp, "grad", " (the dtype of saved)");
  check_same_device(grad, saved, kScaleBackwardOp, "grad", "saved");
  TORCH_CHECK(grad.sizes() == saved.sizes(), kScaleBackwardOp, ": grad must have saved's shape ", saved.sizes(),
              ", got ", grad.sizes());
  const auto g2 = rows_of(grad);
  const auto v = vectors.contiguous();
  at::Tensor grad_x = output_mask[0] ? at::empty_like(g2) : at::empty({0}, grad.options());
  at::Tensor grad_v;
  if (output_mask[1]) {
    grad_v = ia3_task_reduce(g2, rows_of(saved), v, tasks, divide_by_vectors, output_mask[0] ? &grad_x : nullptr)
                 .to(vectors.scalar_type());
  } else {
    grad_v = at::empty({0}, vectors.options());
    if (output_mask[0]) ia3_scale_into(g2, grad_x, v, tasks);
  }
  if (output_mask[0]) grad_x = grad_x.view(grad.sizes());
  return {grad_x, grad_v};
}

}  // namespace

// One device-generic body: ia3_scale_into / ia3_task_reduce pick the device's kernel.
TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("ia3_scale", &ia3_scale);
  m.impl("ia3_scale_", &ia3_scale_);
  m.impl("ia3_scale_backward", &ia3_scale_backward);
}

}  // namespace fastpeft
