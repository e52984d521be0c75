// Op body of the sparse-masked AdamW step on every device: validate, group the parameters by
// dtype, run the device kernel once per dtype (one launch over all tensors of that dtype on CUDA).
//
// The kernels trust the indices to be sorted, unique and in range (validated once, when a mask is
// built or loaded, in fastpeft/optim), except that they skip an index outside [0, numel), so a bad
// mask can never write outside its parameter.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <map>

#include "common/checks.h"
#include "sparse_optim/sparse_optim.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.sparse_adamw_step_";

std::string at_index(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

void check_state_vector(const at::Tensor& t, int64_t count, const at::Tensor& param, const std::string& name) {
  check_dtype(t, at::kFloat, kOp, name, " (optimizer state is float32 for every parameter dtype)");
  check_same_device(t, param, kOp, name, "its parameter");
  TORCH_CHECK(t.numel() == count, kOp, ": ", name, " must have one entry per trained entry (", count, "), got ",
              t.numel());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (it is updated in place)");
}

void check_optional_scalar(const c10::optional<at::Tensor>& t, const at::Tensor& ref, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, kOp, ": ", name,
              " must be a float32 tensor with one element, got ", t->scalar_type(), " of shape ", t->sizes());
  check_same_device(*t, ref, kOp, name, "params[0]");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Validates tensor i and describes it; contiguous copies of inputs land in `keep_alive`.
SparseAdamWTensor describe(size_t i, const at::Tensor& param, const at::Tensor& grad,
                           const c10::optional<at::Tensor>& indices, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& first,
                           std::vector<at::Tensor>& keep_alive) {
  const auto p_name = at_index("params", i);
  check_float(param, kOp, p_name.c_str());
  check_same_device(param, first, kOp, p_name, "params[0]");
  TORCH_CHECK(param.is_contiguous(), kOp, ": ", p_name, " must be contiguous (it is updated in place)");
  const auto g_name = at_index("grads", i);
  TORCH_CHECK(grad.layout() == at::kStrided, kOp, ": ", g_name,
              " must be a dense (strided) gradient, got layout ", grad.layout());
  check_dtype(grad, param.scalar_type(), kOp, g_name, " (the dtype of its parameter)");
  check_same_device(grad, param, kOp, g_name, "its parameter");
  TORCH_CHECK(grad.sizes() == param.sizes(), kOp, ": ", g_name, " must have its parameter's shape ", param.sizes(),
              ", got ", grad.sizes());

  SparseAdamWTensor t{};
  t.param = param.data_ptr();
  const auto g = grad.contiguous();
  if (!g.is_same(grad)) keep_alive.push_back(g);
  t.grad = g.data_ptr();
  t.numel = param.numel();
  t.count = t.numel;
  t.index_kind = IndexKind::None;
  bool vec = true;
  if (indices.has_value() && indices->defined()) {
    const auto i_name = at_index("indices", i);
    TORCH_CHECK(indices->scalar_type() == at::kInt || indices->scalar_type() == at::kLong, kOp, ": ", i_name,
                " must be int32 or int64 (sorted flat indices), got ", indices->scalar_type());
    check_dim(*indices, 1, kOp, i_name);
    check_same_device(*indices, param, kOp, i_name, "its parameter");
    const auto idx = indices->contiguous();
    if (!idx.is_same(*indices)) keep_alive.push_back(idx);
    t.indices = idx.data_ptr();
    t.count = idx.numel();
    TORCH_CHECK(t.count <= t.numel, kOp, ": ", i_name, " has ", t.count, " entries but ", p_name, " has only ",
                t.numel, " elements (indices must be unique)");
    t.index_kind = idx.scalar_type() == at::kInt ? IndexKind::Int32 : IndexKind::Int64;
    vec = aligned16(t.indices);
  }
  check_state_vector(exp_avg, t.count, param, at_index("exp_avgs", i));
  check_state_vector(exp_avg_sq, t.count, param, at_index("exp_avg_sqs", i));
  const auto s_name = at_index("steps", i);
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat, kOp, ": ", s_name,
              " must be a float32 tensor with one element, got ", step.scalar_type(), " of shape ", step.sizes());
  check_same_device(step, param, kOp, s_name, "its parameter");
  t.exp_avg = exp_avg.data_ptr<float>();
  t.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  t.step = step.data_ptr<float>();
  t.vector_aligned = vec && aligned16(t.exp_avg) && aligned16(t.exp_avg_sq);
  return t;
}

using Runner = void (*)(std::vector<SparseAdamWTensor>&, at::ScalarType, const AdamWHyper&,
                        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, at::Device);

void run_cpu(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
             const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf, at::Device) {
  const auto ptr = [](const c10::optional<at::Tensor>& t) {
    return (t.has_value() && t->defined()) ? t->data_ptr<float>() : nullptr;
  };
  sparse_adamw_cpu_kernel(tensors, dtype, h, ptr(grad_scale), ptr(found_inf));
}

#ifdef FASTPEFT_WITH_CUDA
void run_cuda(std::vector<SparseAdamWTensor>& tensors, at::ScalarType dtype, const AdamWHyper& h,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
              at::Device device) {
  const auto get = [](const c10::optional<at::Tensor>& t) {
    return (t.has_value() && t->defined()) ? *t : at::Tensor();
  };
  sparse_adamw_cuda_kernel(tensors, dtype, h, get(grad_scale), get(found_inf), device);
}
#endif

template <Runner Run>
void sparse_adamw_step_(at::TensorList params, at::TensorList grads, const c10::List<c10::optional<at::Tensor>>& indices,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay,
                        const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && indices.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              kOp, ": params, grads, indices, exp_avgs, exp_avg_sqs and steps need one entry per parameter; got ",
              n, ", ", grads.size(), ", ", indices.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
              steps.size());
  TORCH_CHECK(lr >= 0.0, kOp, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, kOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, kOp, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, kOp, ": weight_decay must be >= 0, got ", weight_decay);
  if (n == 0) return;
  check_optional_scalar(grad_scale, params[0], "grad_scale");
  check_optional_scalar(found_inf, params[0], "found_inf");

  std::vector<at::Tensor> keep_alive;
  std::map<at::ScalarType, std::vector<SparseAdamWTensor>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    auto t = describe(i, params[i], grads[i], indices[i], exp_avgs[i], exp_avg_sqs[i], steps[i], params[0], keep_alive);
    if (t.count > 0) by_dtype[params[i].scalar_type()].push_back(t);
  }
  const AdamWHyper h{lr, beta1, beta2, eps, weight_decay};
  for (auto& [dtype, tensors] : by_dtype) Run(tensors, dtype, h, grad_scale, found_inf, params[0].device());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("sparse_adamw_step_", &sparse_adamw_step_<run_cpu>); }

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("sparse_adamw_step_", &sparse_adamw_step_<run_cuda>); }
#endif

}  // namespace fastpeft
