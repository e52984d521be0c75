// Prefix-KV attention op bodies: validate, run the sequence part and the prefix part through
// PyTorch's fused attention and merge them by log-sum-exp (prefix_part.cpp), on every device; on
// the CPU, where causality saves the kernel nothing, one fused call over [prefix; keys] instead
// (joint_attention_cpu.cpp).
//
// Memory rules: [prefix; keys] is never saved (the CPU's joint path builds it inside forward and
// again inside backward; the split path never builds it). Forward allocates the output
// (or merges in place into the sequence kernel's output) and an fp32 [B, H, Sq] log-sum-exp.
// Backward needs q, k, v, the prefix bank, the index, the mask, out and lse: what a flash
// attention backward needs, plus the (small) bank.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>

#include "common/checks.h"
#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "fastpeft.prefix_attention";

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is required");
  check_dim(t, 4, kOp, name);
  check_dtype(t, q.scalar_type(), kOp, name, " (the dtype of q)");
  check_same_device(t, q, kOp, name, "q");
}

// The last GPU prefix_index found in range, held by a weak reference (a freed tensor never matches,
// even if a new one reuses its memory) with its data pointer, bank size and version counter (an
// in-place write bumps the version): the layers after the first skip the host sync. CPU indices
// are checked every call (no sync to save).
struct ValidatedIndex {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  const void* data = nullptr;
  int64_t version = -1, bank = -1;
};
thread_local ValidatedIndex last_validated;

int64_t version_of(const at::Tensor& t) {
  return static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

bool already_validated(const at::Tensor& idx, int64_t bank) {
  if (idx.is_cpu()) return false;
  const auto& v = last_validated;
  const auto held = v.impl.lock();
  return held.defined() && held.get() == idx.unsafeGetTensorImpl() && v.data == idx.const_data_ptr() &&
         v.version == version_of(idx) && v.bank == bank;
}

void remember_validated(const at::Tensor& idx, int64_t bank) {
  if (idx.is_cpu()) return;
  last_validated.impl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(idx.getIntrusivePtr());
  last_validated.data = idx.const_data_ptr();
  last_validated.version = version_of(idx);
  last_validated.bank = bank;
}

PrefixShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                         const at::Tensor& prefix_v, const c10::optional<at::Tensor>& prefix_index,
                         const c10::optional<at::Tensor>& attention_mask, const c10::optional<double>& scale) {
  check_float(q, kOp, "q");
  check_dim(q, 4, kOp, "q");
  check_like_q(k, q, "k");
  check_like_q(v, q, "v");
  check_like_q(prefix_k, q, "prefix_k");
  check_like_q(prefix_v, q, "prefix_v");
  PrefixShape s;
  s.B = q.size(0), s.H = q.size(1), s.Sq = q.size(2), s.D = q.size(3);
  s.Hkv = k.size(1), s.Skv = k.size(2);
  s.N = prefix_k.size(0), s.P = prefix_k.size(2);
  TORCH_CHECK(s.D >= 1, kOp, ": q must have a head size D >= 1, got shape ", q.sizes());
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D, kOp, ": k must be [B=", s.B, ", Hkv, Skv, D=", s.D,
              "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(s.Hkv >= 1 && s.H % s.Hkv == 0, kOp, ": the ", s.H, " query heads of q must be a multiple of the ",
              s.Hkv, " key/value heads of k (grouped-query attention); got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(prefix_k.size(1) == s.Hkv && prefix_k.size(3) == s.D, kOp, ": prefix_k must be [N, Hkv=", s.Hkv,
              ", P, D=", s.D, "] (one prefix set per row of the bank, heads and head size of k), got ",
              prefix_k.sizes());
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), kOp, ": prefix_v must have the shape of prefix_k ",
              prefix_k.sizes(), ", got ", prefix_v.sizes());
  TORCH_CHECK(s.N >= 1 || s.B == 0, kOp, ": prefix_k holds no prefix set (N = 0) but the batch has ", s.B,
              " examples");
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), kOp, ": scale must be finite, got ", *scale);
  }

  if (prefix_index.has_value() && prefix_index->defined()) {
    const auto& idx = *prefix_index;
    TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, kOp,
                ": prefix_index must be an int64 (or int32) tensor, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == s.B, kOp, ": prefix_index must be [B=", s.B,
                "] (one prefix set per example), got shape ", idx.sizes());
    TORCH_CHECK(idx.is_cpu() || idx.device() == q.device(), kOp, ": prefix_index is on ", idx.device(),
                " but q is on ", q.device(), "; pass it on the CPU or on q's device");
    if (s.B > 0 && !already_validated(idx, s.N)) {
      // A host sync for an index on the GPU, once per index tensor: every layer of a forward gets
      // the same one, and already_validated remembers it (an index past the bank would read out
      // of bounds; a device-side assert would end the CUDA context instead of raising).
      const auto [lo, hi] = at::aminmax(idx);
      const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
      TORCH_CHECK(min >= 0 && max < s.N, kOp, ": prefix_index must be in [0, N=", s.N,
                  ") (the sets of the prefix bank), got values in [", min, ", ", max, "]");
      remember_validated(idx, s.N);
    }
  }

  if (attention_mask.has_value() && attention_mask->defined()) {
    const auto& m = *attention_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || is_float_dtype(m.scalar_type()), kOp,
                ": attention_mask must be bool (True = attend) or an additive float mask, got ", m.scalar_type());
    check_same_device(m, q, kOp, "attention_mask", "q");
    const bool padding = m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.Skv;
    const bool full = m.dim() == 4 && (m.size(0) == 1 || m.size(0) == s.B) && (m.size(1) == 1 || m.size(1) == s.H) &&
                      (m.size(2) == 1 || m.size(2) == s.Sq) && m.size(3) == s.Skv;
    TORCH_CHECK(padding || full, kOp, ": attention_mask must be [B=", s.B, ", Skv=", s.Skv,
                "] (key padding) or broadcastable [B|1, H|1, Sq|1, Skv] = [", s.B, "|1, ", s.H, "|1, ", s.Sq,
                "|1, ", s.Skv, "], got ", m.sizes());
  }
  return s;
}

double scale_or_default(const c10::optional<double>& scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor index_on(const c10::optional<at::Tensor>& prefix_index, const at::Device& device) {
  if (!prefix_index.has_value() || !prefix_index->defined()) return at::Tensor();
  return prefix_index->to(device, at::kLong).contiguous();
}

// The output layout is the one the device's fused kernels write and read back in backward: on CUDA
// [B, H, Sq, D] stored as [B, Sq, H, D] (what HF's attention functions return after transpose(1, 2)
// without a copy); on the CPU contiguous [B, H, Sq, D] (the CPU kernel's forward writes that, and
// its backward copies any other layout of out once more: at S 128, B 8 the two copies were ~7% of a
// step). fastpeft/ops/prefix_attention.py's fake kernel makes the same choice.
at::Tensor empty_output(const PrefixShape& s, const at::Tensor& q) {
  if (q.is_cpu()) return at::empty({s.B, s.H, s.Sq, s.D}, q.options());
  return at::empty({s.B, s.Sq, s.H, s.D}, q.options()).transpose(1, 2);
}

bool has_output_layout(const at::Tensor& t, const PrefixShape& s) {
  auto same = [](int64_t size, int64_t stride, int64_t expected) { return size <= 1 || stride == expected; };
  if (t.is_cpu())
    return same(s.D, t.stride(3), 1) && same(s.Sq, t.stride(2), s.D) && same(s.H, t.stride(1), s.Sq * s.D) &&
           same(s.B, t.stride(0), s.H * s.Sq * s.D);
  return same(s.D, t.stride(3), 1) && same(s.H, t.stride(1), s.D) && same(s.Sq, t.stride(2), s.H * s.D) &&
         same(s.B, t.stride(0), s.Sq * s.H * s.D);
}

// Gradients come back in the layout of their input (what empty_like gives), copied if needed.
at::Tensor in_layout_of(const at::Tensor& grad, const at::Tensor& input) {
  auto like = at::empty_like(input);
  if (grad.sizes() == like.sizes() && grad.strides() == like.strides()) return grad;
  return like.copy_(grad);
}

std::tuple<at::Tensor, at::Tensor> prefix_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                    const c10::optional<at::Tensor>& prefix_index,
                                                    const c10::optional<at::Tensor>& attention_mask, bool causal,
                                                    c10::optional<double> scale_opt) {
  const auto s = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, scale_opt);
  const double scale = scale_or_default(scale_opt, s.D);
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.Sq == 0) return {empty_output(s, q), lse};

  const auto qc = last_dim_contiguous(q);
  at::Tensor seq_out, seq_lse, out;
  if (s.Skv > 0) {
    const auto mask = prepare_sequence_mask(attention_mask, causal, s, q);
    if (joint_cpu_applies(q, s, mask.causal_flag)) {
      auto [joint_out, joint_lse] = joint_cpu_forward(qc, last_dim_contiguous(k), last_dim_contiguous(v),
                                                      prefix_k.contiguous(), prefix_v.contiguous(),
                                                      index_on(prefix_index, q.device()), mask, s, scale);
      out = has_output_layout(joint_out, s) ? joint_out : empty_output(s, q).copy_(joint_out);
      return {out, joint_lse.contiguous()};
    }
    auto seq = sequence_attention_forward(qc, last_dim_contiguous(k), last_dim_contiguous(v), mask, scale);
    seq_out = seq.out;
    seq_lse = seq.lse;
    out = has_output_layout(seq_out, s) ? seq_out : empty_output(s, q);  // merge in place when we can
  } else {
    out = empty_output(s, q);
    seq_out = out;  // never read: every row's sequence lse is -inf
    seq_lse = at::full({s.B, s.H, s.Sq}, -std::numeric_limits<float>::infinity(), lse.options());
  }
  prefix_merge_forward(qc, seq_out, seq_lse, prefix_k.contiguous(), prefix_v.contiguous(),
                       index_on(prefix_index, q.device()), scale, out, lse);
  return {out, lse};
}

// The op's gradient outputs: each in its input's dtype and layout, an empty tensor where
// output_mask did not ask for it, zeros for an empty batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients(
    const c10::List<bool>& output_mask, bool empty, std::array<at::Tensor, 5> grads, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v) {
  auto result = [&](size_t i, const at::Tensor& input) {
    if (!output_mask[i]) return at::empty({0}, input.options());
    if (empty) return at::zeros_like(input);
    const auto& grad = grads[i];
    return in_layout_of(grad.scalar_type() == input.scalar_type() ? grad : grad.to(input.scalar_type()), input);
  };
  return {result(0, q), result(1, k), result(2, v), result(3, prefix_k), result(4, prefix_v)};
}

// output_mask: [q, k, v, prefix_k, prefix_v]; gradients not asked for come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const c10::optional<at::Tensor>& prefix_index,
    const c10::optional<at::Tensor>& attention_mask, const at::Tensor& out, const at::Tensor& lse, bool causal,
    c10::optional<double> scale_opt, const c10::List<bool>& output_mask) {
  const auto s = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, scale_opt);
  constexpr const char* op = "fastpeft.prefix_attention_backward";
  TORCH_CHECK(output_mask.size() == 5, op, ": output_mask must have 5 entries (q, k, v, prefix_k, prefix_v), got ",
              output_mask.size());
  auto check_like_out = [&](const at::Tensor& t, const char* name) {
    check_like_q(t, q, name);
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(out, "out");
  check_dtype(lse, at::kFloat, op, "lse");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.Sq, op,
              ": lse must be [B, H, Sq] = [", s.B, ", ", s.H, ", ", s.Sq, "], got ", lse.sizes());
  const bool need_q = output_mask[0], need_k = output_mask[1], need_v = output_mask[2];
  const bool need_bank = output_mask[3] || output_mask[4];
  const double scale = scale_or_default(scale_opt, s.D);

  at::Tensor grad_q, grad_k, grad_v, grad_pk, grad_pv;
  const bool empty = s.B * s.H * s.Sq == 0;
  if (need_bank) {
    grad_pk = at::zeros(prefix_k.sizes(), prefix_k.options().dtype(at::kFloat));
    grad_pv = at::zeros(prefix_v.sizes(), prefix_v.options().dtype(at::kFloat));
  }
  SequenceMask mask;  // prepared once, for whichever path runs
  if (!empty && s.Skv > 0) {
    mask = prepare_sequence_mask(attention_mask, causal, s, q);
    if (joint_cpu_applies(q, s, mask.causal_flag)) {  // one backward call computes every gradient
      std::tie(grad_q, grad_k, grad_v) = joint_cpu_backward(
          last_dim_contiguous(grad_out), last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v),
          prefix_k.contiguous(), prefix_v.contiguous(), index_on(prefix_index, q.device()), mask, s,
          last_dim_contiguous(out), lse.contiguous(), scale, grad_pk, grad_pv);
      return gradients(output_mask, empty, {grad_q, grad_k, grad_v, grad_pk, grad_pv}, q, k, v, prefix_k, prefix_v);
    }
  }
  if ((need_q || need_k || need_v) && !empty) {
    if (s.Skv > 0) {
      std::tie(grad_q, grad_k, grad_v) =
          sequence_attention_backward(last_dim_contiguous(grad_out), last_dim_contiguous(q), last_dim_contiguous(k),
                                      last_dim_contiguous(v), mask, last_dim_contiguous(out), lse.contiguous(), scale);
      grad_q = last_dim_contiguous(grad_q);
    } else {
      // In the standard layout, like the sequence kernels' grad_q (in_layout_of restores q's).
      grad_q = at::zeros(q.sizes(), q.options());
      grad_k = at::zeros_like(k);
      grad_v = at::zeros_like(v);
    }
  }
  if ((need_q || need_bank) && !empty && s.P > 0) {
    at::Tensor grad_q_prefix = need_q ? grad_q : at::Tensor();
    prefix_backward(last_dim_contiguous(grad_out), last_dim_contiguous(q), last_dim_contiguous(out), lse.contiguous(),
                    prefix_k.contiguous(), prefix_v.contiguous(), index_on(prefix_index, q.device()), scale,
                    grad_q_prefix, grad_pk, grad_pv);
  }
  return gradients(output_mask, empty, {grad_q, grad_k, grad_v, grad_pk, grad_pv}, q, k, v, prefix_k, prefix_v);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("prefix_attention", &prefix_attention);
  m.impl("prefix_attention_backward", &prefix_attention_backward);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("prefix_attention", &prefix_attention);
  m.impl("prefix_attention_backward", &prefix_attention_backward);
}
#endif

}  // namespace fastpeft
