// Op bodies of the sparse-delta building blocks: validate, then run the device kernel.
//   sparse_delta_add_          out.flatten()[indices] += values (dense frozen base)
//   dequantize_4bit_add_delta_ the 4-bit dequantization with the delta added before rounding
//   sparse_delta_weight_grad   dL/dD at the indices: a sampled product of grad_out and x
//
// The kernels trust indices to be sorted and unique (validated once in Python when a mask or a
// SparseDeltaLinear is built); an index outside the weight is skipped, never written (the dense
// weight-gradient path, above the density crossover, raises on one instead).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>

#include "common/checks.h"
#include "quant4bit/quant4bit.h"
#include "sparse_delta/sparse_delta.h"

namespace fastpeft {

std::pair<at::Tensor, at::Tensor> checked_delta(const at::Tensor& indices, const at::Tensor& values, int64_t numel,
                                                const at::Device& device, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64 (sorted flat indices into the weight), got ", indices.scalar_type());
  check_dim(indices, 1, op, "indices");
  check_float(values, op, "values");
  check_dim(values, 1, op, "values");
  TORCH_CHECK(values.numel() == indices.numel(), op, ": values must have one entry per index (", indices.numel(),
              "), got ", values.numel());
  TORCH_CHECK(indices.device() == device, op, ": indices is on ", indices.device(), " but the weight is on ", device,
              "; move them to the same device");
  TORCH_CHECK(values.device() == device, op, ": values is on ", values.device(), " but the weight is on ", device,
              "; move them to the same device");
  TORCH_CHECK(indices.numel() <= numel, op, ": ", indices.numel(), " indices cannot be unique in a weight of ", numel,
              " elements");
  return {indices.contiguous(), values.to(at::kFloat).contiguous()};
}

namespace {

constexpr const char* kAddOp = "fastpeft.sparse_delta_add_";
constexpr const char* kDequantOp = "fastpeft.dequantize_4bit_add_delta_";
constexpr const char* kGradOp = "fastpeft.sparse_delta_weight_grad";

template <void (*Kernel)(at::Tensor&, const at::Tensor&, const at::Tensor&)>
void sparse_delta_add_(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values) {
  check_float(out, kAddOp, "out");
  TORCH_CHECK(out.is_contiguous(), kAddOp, ": out must be contiguous (it is updated in place)");
  const auto [idx, vals] = checked_delta(indices, values, out.numel(), out.device(), kAddOp);
  if (idx.numel() == 0) return;
  Kernel(out, idx, vals);
}

template <void (*Kernel)(const Quant4bitWeight&, const Quant4bitDelta&, at::Tensor&)>
void dequantize_4bit_add_delta_(const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code,
                                const c10::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                int64_t nested_blocksize, c10::string_view quant_type, const at::Tensor& indices,
                                const at::Tensor& values, at::Tensor& out) {
  check_float(out, kDequantOp, "out");
  TORCH_CHECK(out.is_contiguous(), kDequantOp, ": out must be contiguous (it is the workspace the weight is written to)");
  check_same_device(out, packed, kDequantOp, "out", "packed");
  const auto w = make_quant4bit_weight(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                       nested_blocksize, parse_quant_type(std::string(quant_type), kDequantOp),
                                       out.numel(), kDequantOp);
  const auto [idx, vals] = checked_delta(indices, values, out.numel(), out.device(), kDequantOp);
  if (out.numel() == 0) return;
  Kernel(w, Quant4bitDelta{idx, vals}, out);
}

// Rows of the transposed token chunks are padded to a multiple of 8 elements (16 bytes in
// half precision) so the CUDA kernel can use vector loads on every row; the padding is zero.
constexpr int64_t kRowPad = 8;

at::Tensor transposed_padded(const at::Tensor& rows, int64_t padded_len) {
  auto t = at::empty({rows.size(1), padded_len}, rows.options());
  if (padded_len > rows.size(0)) t.narrow(1, rows.size(0), padded_len - rows.size(0)).zero_();
  t.narrow(1, 0, rows.size(0)).copy_(rows.t());
  return t;
}

// Density (k / (out_features * in_features)) from which dL/dD is one dense GEMM grad_out^T x in
// float32 followed by a gather at the indices, instead of the sampled product (SDDMM) above.
// CPU: measured on the AMD EPYC (2 cores, 512 tokens, 1024 x 1024 / 1024 x 2816 / 2816 x 1024,
// bench_sparse_delta.py weight-grad rows): the SDDMM took 0.65..0.82x the dense path's time at 10%
// density and 1.19..1.30x at 20%, so the dense path starts at 15%. CUDA: 0.5%, the review's
// estimate from the kernels' code (issue 16), until those rows are measured on a GPU.
// FASTPEFT_SDDMM_CROSSOVER=<density> overrides both (tests use it to run each path).
double dense_grad_crossover(const at::Tensor& x) {
  if (const char* env = std::getenv("FASTPEFT_SDDMM_CROSSOVER")) return std::atof(env);
  return x.is_cuda() ? 0.005 : 0.15;
}

// dL/dD = (grad_out^T x)[indices], the product in float32.
at::Tensor dense_grad_at(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& idx) {
  const bool exact = x2.scalar_type() == at::kFloat;
  const auto dense = exact ? at::mm(g2.t(), x2)
                     : x2.is_cuda() ? at::mm(g2.t(), x2, at::kFloat)  // bf16/fp16 GEMM, fp32 output
                                    : at::mm(g2.t().to(at::kFloat), x2.to(at::kFloat));
  return dense.reshape({-1}).index_select(0, idx.to(at::kLong));
}

template <void (*Kernel)(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>
at::Tensor sparse_delta_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                    int64_t chunk_tokens) {
  check_float(x, kGradOp, "x");
  check_dtype(grad_out, x.scalar_type(), kGradOp, "grad_out", " (the dtype of x)");
  check_same_device(grad_out, x, kGradOp, "grad_out", "x");
  TORCH_CHECK(x.dim() >= 1 && grad_out.dim() == x.dim(), kGradOp, ": grad_out [..., out_features] and x [..., in_features] must have the same leading shape, got ",
              grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1), kGradOp,
              ": grad_out and x must have the same leading shape, got ", grad_out.sizes(), " and ", x.sizes());
  const int64_t K = x.size(-1), O = grad_out.size(-1);
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, kGradOp,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  check_dim(indices, 1, kGradOp, "indices");
  check_same_device(indices, x, kGradOp, "indices", "x");
  auto acc = at::zeros({indices.numel()}, x.options().dtype(at::kFloat));
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  if (indices.numel() == 0 || M == 0 || K == 0 || O == 0) return acc;
  const auto idx = indices.contiguous();
  const auto g2 = grad_out.reshape({M, O});
  const auto x2 = x.reshape({M, K});
  TORCH_CHECK(chunk_tokens >= 0, kGradOp, ": chunk_tokens must be >= 0 (0: automatic), got ", chunk_tokens);
  const double density = static_cast<double>(indices.numel()) / (static_cast<double>(O) * static_cast<double>(K));
  if (density >= dense_grad_crossover(x)) return dense_grad_at(g2, x2, idx);
  // Tokens go in chunks so the transposed copies stay under ~64 MiB whatever the batch.
  const int64_t row_bytes = (O + K) * x.element_size();
  int64_t chunk = chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(kRowPad, (int64_t(64) << 20) / row_bytes);
  chunk = std::min(chunk, M);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t len = std::min(chunk, M - m0);
    const int64_t padded = (len + kRowPad - 1) / kRowPad * kRowPad;
    const auto g_t = transposed_padded(g2.narrow(0, m0, len), padded);
    const auto x_t = transposed_padded(x2.narrow(0, m0, len), padded);
    Kernel(acc, g_t, x_t, idx);
  }
  return acc;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("sparse_delta_add_", &sparse_delta_add_<sparse_delta_add_cpu>);
  m.impl("dequantize_4bit_add_delta_", &dequantize_4bit_add_delta_<dequantize_4bit_add_delta_cpu_kernel>);
  m.impl("sparse_delta_weight_grad", &sparse_delta_weight_grad<sparse_delta_rows_dot_accum_cpu>);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("sparse_delta_add_", &sparse_delta_add_<sparse_delta_add_cuda>);
  m.impl("dequantize_4bit_add_delta_", &dequantize_4bit_add_delta_<dequantize_4bit_add_delta_cuda_kernel>);
  m.impl("sparse_delta_weight_grad", &sparse_delta_weight_grad<sparse_delta_rows_dot_accum_cuda>);
}
#endif

}  // namespace fastpeft
