// Fused linear cross-entropy, one device-generic body: for a chunk of tokens at a time, the logits
// GEMM (plus the bias and a LoRA update on the head), the row-wise loss and logits gradient in place
// (cross_entropy_rows_, this family's kernel), and the gradient GEMMs into hidden and the LoRA
// factors. Loss and gradients come out of one call, as in Liger's fused linear cross-entropy: the
// caller's backward only scales them by the incoming gradient.
//
// Memory rules (the point of the op):
//  - no [tokens, vocab] tensor exists: one [chunk, vocab] buffer is reused for the logits and their
//    gradient (chunk_tokens rows; 0 chooses ~64 MiB);
//  - a quantized head weight is dequantized once per call into the shared workspace, never kept;
//  - what survives the call is the loss, grad_hidden [tokens, hidden] and the LoRA factor gradients.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/checks.h"
#include "common/frozen_weights.h"
#include "linear_cross_entropy/linear_cross_entropy.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.linear_cross_entropy";
constexpr const char* kRowsOp = "fastpeft.cross_entropy_rows_";

void check_rows_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& loss, double softcap) {
  check_float(logits, kRowsOp, "logits");
  check_dim(logits, 2, kRowsOp, "logits");
  TORCH_CHECK(logits.is_contiguous(), kRowsOp, ": logits must be contiguous (it is overwritten with its gradient)");
  check_dtype(labels, at::kLong, kRowsOp, "labels");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), kRowsOp, ": labels must be [", logits.size(0),
              "] (one per row of logits), got ", labels.sizes());
  check_dtype(loss, at::kFloat, kRowsOp, "loss");
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == logits.size(0) && loss.is_contiguous(), kRowsOp,
              ": loss must be a contiguous float32 [", logits.size(0), "], got ", loss.sizes());
  check_same_device(labels, logits, kRowsOp, "labels", "logits");
  check_same_device(loss, logits, kRowsOp, "loss", "logits");
  TORCH_CHECK(softcap >= 0.0, kRowsOp, ": softcap must be >= 0 (0: none), got ", softcap);
}

void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
  if (!labels.is_cpu() || labels.numel() == 0) return;  // CUDA: a device-side assert, no host sync
  const int64_t* p = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < V), op, ": labels[", i, "] = ", p[i],
                " is neither ignore_index (", ignore_index, ") nor a class in [0, ", V, ")");
  }
}

template <void (*Kernel)(at::Tensor&, const at::Tensor&, at::Tensor&, const CrossEntropyRows&)>
void cross_entropy_rows_(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, double softcap,
                         int64_t ignore_index, double grad_scale) {
  check_rows_args(logits, labels, loss, softcap);
  const auto labels_c = labels.contiguous();
  check_label_range(labels_c, logits.size(1), ignore_index, kRowsOp);
  if (logits.numel() == 0) {
    loss.zero_();
    return;
  }
  Kernel(logits, labels_c, loss, {softcap, ignore_index, grad_scale});
}

void call_rows(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, double softcap, int64_t ignore_index,
               double grad_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::cross_entropy_rows_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, at::Tensor&, double, int64_t, double)>();
  op.call(logits, labels, loss, softcap, ignore_index, grad_scale);
}

// output_mask: [hidden, lora (A and B)].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, c10::string_view weight_format, const OptTensorList& weight_tensors,
    at::IntArrayRef weight_ints, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    const c10::optional<at::Tensor>& lora_A, const c10::optional<at::Tensor>& lora_B, double lora_scaling,
    int64_t ignore_index, c10::string_view reduction, double softcap, int64_t chunk_tokens,
    const c10::List<bool>& output_mask) {
  check_float(hidden, kOp, "hidden");
  check_dim(hidden, 2, kOp, "hidden");
  const int64_t N = hidden.size(0), H = hidden.size(1);
  const auto W = parse_frozen_weight(weight_format, weight_tensors, weight_ints, hidden, H, kOp);
  const int64_t V = W.out_features;
  check_dtype(labels, at::kLong, kOp, "labels");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, kOp, ": labels must be [", N, "] (one per row of hidden), got ",
              labels.sizes());
  check_same_device(labels, hidden, kOp, "labels", "hidden");
  TORCH_CHECK(reduction == "mean" || reduction == "sum", kOp, ": reduction must be 'mean' or 'sum', got '",
              std::string(reduction), "'");
  TORCH_CHECK(output_mask.size() == 2, kOp, ": output_mask must have 2 entries [hidden, lora], got ", output_mask.size());
  TORCH_CHECK(chunk_tokens >= 0, kOp, ": chunk_tokens must be >= 0 (0: automatic), got ", chunk_tokens);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dtype(*bias, hidden.scalar_type(), kOp, "bias", " (the dtype of hidden)");
    check_same_device(*bias, hidden, kOp, "bias", "hidden");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, kOp, ": bias must be [", V, "], got ", bias->sizes());
  }
  const bool has_lora = lora_A.has_value() && lora_A->defined();
  TORCH_CHECK(has_lora == (lora_B.has_value() && lora_B->defined()), kOp, ": lora_A and lora_B go together");
  int64_t r = 0;
  if (has_lora) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*lora_A, "lora_A"}, {*lora_B, "lora_B"}}) {
      check_dim(t, 2, kOp, name);
      check_dtype(t, hidden.scalar_type(), kOp, name, " (the dtype of hidden; cast the adapter to the compute dtype)");
      check_same_device(t, hidden, kOp, name, "hidden");
    }
    r = lora_A->size(0);
    TORCH_CHECK(lora_A->size(1) == H, kOp, ": lora_A must be [r, ", H, "], got ", lora_A->sizes());
    TORCH_CHECK(lora_B->size(0) == V && lora_B->size(1) == r, kOp, ": lora_B must be [", V, ", ", r, "], got ",
                lora_B->sizes());
  }
  const bool need_h = output_mask[0], need_lora = output_mask[1] && has_lora;
  const auto labels_c = labels.contiguous();
  check_label_range(labels_c, V, ignore_index, kOp);

  // One host read per call: the mean divides by the number of tokens that count.
  const int64_t valid = reduction == "mean" ? labels_c.ne(ignore_index).sum().item<int64_t>() : 1;
  const double scale = reduction == "mean" ? (valid > 0 ? 1.0 / static_cast<double>(valid) : 0.0) : 1.0;

  const auto h = hidden.contiguous();
  const int64_t elem = hidden.element_size();
  const int64_t auto_chunk = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, V * elem));
  const int64_t C = std::max<int64_t>(1, std::min<int64_t>(N, chunk_tokens > 0 ? chunk_tokens : auto_chunk));

  auto w = W.materialize(hidden.scalar_type(), hidden.device());  // held for the whole call
  auto loss_rows = at::empty({N}, hidden.options().dtype(at::kFloat));
  at::Tensor grad_h = need_h ? at::empty_like(h) : at::empty({0}, hidden.options());
  at::Tensor gA32, gB32;
  if (need_lora) {
    gA32 = at::zeros({r, H}, hidden.options().dtype(at::kFloat));
    gB32 = at::zeros({V, r}, hidden.options().dtype(at::kFloat));
  }
  at::Tensor buffer = at::empty({C, V}, hidden.options());
  for (int64_t start = 0; start < N; start += C) {
    const int64_t c = std::min(C, N - start);
    const auto hc = h.narrow(0, start, c);
    auto logits = buffer.narrow(0, 0, c);
    if (has_bias) {
      logits.copy_(bias->unsqueeze(0).expand({c, V}));
      logits.addmm_(hc, w.t());
    } else {
      at::mm_out(logits, hc, w.t());
    }
    at::Tensor shrink;
    if (has_lora) {
      shrink = at::mm(hc, lora_A->t());  // [c, r]
      logits.addmm_(shrink, lora_B->t(), /*beta=*/1.0, /*alpha=*/lora_scaling);
    }
    auto loss_c = loss_rows.narrow(0, start, c);
    call_rows(logits, labels_c.narrow(0, start, c), loss_c, softcap, ignore_index, scale);
    if (!need_h && !need_lora) continue;
    at::Tensor g_shrink;  // d loss / d shrink = scaling * grad_logits B, [c, r]
    if (has_lora) g_shrink = at::mm(logits, *lora_B).mul_(lora_scaling);
    if (need_h) {
      auto gh = grad_h.narrow(0, start, c);
      at::mm_out(gh, logits, w);
      if (has_lora) gh.addmm_(g_shrink, *lora_A);
    }
    if (need_lora) {
      gB32.add_(at::mm(logits.t(), shrink).mul_(lora_scaling));
      gA32.add_(at::mm(g_shrink.t(), hc));
    }
  }
  // As F.cross_entropy: a mean over no counted token is NaN (its gradients are zero).
  auto loss = (reduction == "mean" && valid == 0) ? at::full({}, std::numeric_limits<float>::quiet_NaN(), loss_rows.options())
                                                  : loss_rows.sum() * scale;
  at::Tensor gA = need_lora ? gA32.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
  at::Tensor gB = need_lora ? gB32.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
  return {loss, grad_h, gA, gB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("cross_entropy_rows_", &cross_entropy_rows_<cross_entropy_rows_cpu>); }

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("cross_entropy_rows_", &cross_entropy_rows_<cross_entropy_rows_cuda>); }
#endif

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }

}  // namespace fastpeft
