// The sequence part of prefix attention: softmax(q k^T * scale + mask) v over the sequence keys
// only, through the fused kernels PyTorch ships, which also return the log-sum-exp the merge needs.
//
//   CPU                       aten::_scaled_dot_product_flash_attention_for_cpu (GQA, masks)
//   CUDA fp16/bf16, no mask   aten::_scaled_dot_product_flash_attention (GQA natively, D <= 256)
//   CUDA otherwise            aten::_scaled_dot_product_efficient_attention (additive bias; K/V
//                             heads are expanded for GQA because the kernel needs H == Hkv)
//   anything else             plain ATen math in fp32 (FASTPEFT_PREFIX_SEQ_BACKEND=math forces it)
//
// Backward calls the matching backward kernel with the *merged* output and log-sum-exp: those
// kernels compute P = exp(s - lse) and Delta = rowsum(dO * out) from what they are given, so they
// return exactly the sequence part of the gradient of the joint (prefix + sequence) softmax.
#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class SeqBackend { CpuFlash, CudaFlash, CudaEfficient, Math };

bool math_forced() {
  const char* env = std::getenv("FASTPEFT_PREFIX_SEQ_BACKEND");
  return env != nullptr && std::string(env) == "math";
}

// A pure function of the inputs, so forward and backward always pick the same kernel.
SeqBackend choose_backend(const at::Tensor& q, const SequenceMask& mask) {
  if (math_forced()) return SeqBackend::Math;
  if (q.is_cpu()) return SeqBackend::CpuFlash;
  if (q.is_cuda()) {
    const int64_t D = q.size(3);
    const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
    if (half && !mask.bias.defined() && D % 8 == 0 && D <= 256) return SeqBackend::CudaFlash;
    if (D % 8 == 0) return SeqBackend::CudaEfficient;
  }
  return SeqBackend::Math;
}

int64_t group_of(const at::Tensor& q, const at::Tensor& k) { return q.size(1) / k.size(1); }

// [B, Hkv, S, D] -> [B, H, S, D] (a copy): only for kernels that need one key head per query head.
at::Tensor expand_kv_heads(const at::Tensor& t, int64_t group) {
  if (group == 1) return t;
  const auto B = t.size(0), Hkv = t.size(1), S = t.size(2), D = t.size(3);
  return t.unsqueeze(2).expand({B, Hkv, group, S, D}).reshape({B, Hkv * group, S, D});
}

// [B, H, S, D] gradients of expanded heads -> [B, Hkv, S, D], summed over each group.
at::Tensor reduce_kv_heads(const at::Tensor& t, int64_t group) {
  if (group == 1) return t;
  const auto B = t.size(0), H = t.size(1), S = t.size(2), D = t.size(3);
  return t.reshape({B, H / group, group, S, D}).sum(2);
}

// The mem-efficient kernel reads the bias row by row and needs each row 16-element aligned (the
// padding PyTorch's SDPA applies too); broadcast dims may keep stride 0.
at::Tensor efficient_bias(const at::Tensor& bias, const at::Tensor& q, const at::Tensor& k) {
  if (!bias.defined()) return bias;
  const int64_t Skv = k.size(2);
  const int64_t padded = (Skv + 15) / 16 * 16;
  auto sizes = bias.sizes().vec();
  sizes[3] = padded;
  auto storage = at::empty(sizes, bias.options());
  auto aligned = storage.narrow(3, 0, Skv);
  aligned.copy_(bias);
  return aligned.expand({q.size(0), q.size(1), q.size(2), Skv});
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// fp32 scores of the math path, mask and causality applied: [B, H, Sq, Skv].
at::Tensor math_scores(const at::Tensor& q, const at::Tensor& k_expanded, const SequenceMask& mask, double scale) {
  auto s = at::matmul(q.to(at::kFloat), k_expanded.to(at::kFloat).transpose(-1, -2)).mul_(scale);
  if (mask.bias.defined()) s.add_(mask.bias.to(at::kFloat));
  if (mask.causal_flag) {
    const auto future = at::ones({s.size(2), s.size(3)}, q.options().dtype(at::kBool)).triu(1);
    s.masked_fill_(future, kNegInf);
  }
  return s;
}

// exp(s - lse) with rows whose lse is -inf (no key at all) set to 0 instead of NaN.
at::Tensor probabilities(const at::Tensor& scores, const at::Tensor& lse) {
  const auto l = lse.unsqueeze(-1);
  return (scores - l).exp_().masked_fill_(l.eq(kNegInf), 0.0);
}

SequenceForward math_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const SequenceMask& mask, double scale) {
  const int64_t g = group_of(q, k);
  const auto s = math_scores(q, expand_kv_heads(k, g), mask, scale);
  const auto lse = s.logsumexp(-1);
  const auto out = at::matmul(probabilities(s, lse), expand_kv_heads(v, g).to(at::kFloat)).to(q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> math_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                              const at::Tensor& k, const at::Tensor& v,
                                                              const SequenceMask& mask, const at::Tensor& out,
                                                              const at::Tensor& lse, double scale) {
  const int64_t g = group_of(q, k);
  const auto kx = expand_kv_heads(k, g).to(at::kFloat);
  const auto vx = expand_kv_heads(v, g).to(at::kFloat);
  const auto p = probabilities(math_scores(q, kx, mask, scale), lse);
  const auto dout = grad_out.to(at::kFloat);
  const auto delta = (dout * out.to(at::kFloat)).sum(-1, /*keepdim=*/true);
  const auto grad_v = at::matmul(p.transpose(-1, -2), dout);
  const auto ds = p.mul_(at::matmul(dout, vx.transpose(-1, -2)).sub_(delta));
  const auto grad_q = at::matmul(ds, kx).mul_(scale);
  const auto grad_k = at::matmul(ds.transpose(-1, -2), q.to(at::kFloat)).mul_(scale);
  const auto dt = q.scalar_type();
  return {grad_q.to(dt), reduce_kv_heads(grad_k, g).to(dt), reduce_kv_heads(grad_v, g).to(dt)};
}

}  // namespace

SequenceMask prepare_sequence_mask(const c10::optional<at::Tensor>& attention_mask, bool causal,
                                   const PrefixShape& s, const at::Tensor& q) {
  SequenceMask m;
  const auto dtype = q.scalar_type();
  if (attention_mask.has_value() && attention_mask->defined()) {
    auto am = *attention_mask;
    if (am.dim() == 2) am = am.view({am.size(0), 1, 1, am.size(1)});  // key padding mask [B, Skv]
    if (am.scalar_type() == at::kBool) {
      m.bias = at::zeros(am.sizes(), am.options().dtype(dtype)).masked_fill_(am.logical_not(), kNegInf);
    } else {
      m.bias = am.to(dtype);
    }
  }
  if (causal && s.Sq == s.Skv) {
    m.causal_flag = true;
  } else if (causal && s.Sq > 1) {
    // Bottom-right alignment (the last query sits on the last key), as in chunked prefill with a
    // cache: query i sees key j iff j <= i + Skv - Sq. The fused kernels align causal masks
    // top-left, so this case becomes part of the bias.
    const auto opts = q.options().dtype(at::kLong);
    const auto last_visible = at::arange(s.Sq, opts).add_(s.Skv - s.Sq).unsqueeze(1);
    const auto future = at::arange(s.Skv, opts).unsqueeze(0).gt(last_visible);
    const auto causal_bias = at::zeros({1, 1, s.Sq, s.Skv}, q.options()).masked_fill_(future.view({1, 1, s.Sq, s.Skv}), kNegInf);
    m.bias = m.bias.defined() ? m.bias + causal_bias : causal_bias;
  }
  if (!m.bias.defined()) return m;  // every row sees at least one key

  // Rows that see no sequence key get lse = -inf so the merge ignores their (0 or NaN) output;
  // the prefix alone then decides them. Only -inf entries count as hidden: a finite "minimum"
  // bias (HF eager masks) is kept as the reference softmax keeps it.
  const auto visible = m.bias.gt(kNegInf);
  if (!m.causal_flag) {
    m.row_empty = visible.any(-1).logical_not();
  } else if (visible.size(2) == 1) {
    // Key padding under causality (Sq == Skv): row i sees keys 0..i, so it is empty iff none of
    // them is visible; a running count over keys answers that without an Sq x Skv tensor.
    m.row_empty = visible.squeeze(2).to(at::kInt).cumsum(-1).eq(0);
  } else {
    const auto past = at::ones({s.Sq, s.Skv}, q.options().dtype(at::kBool)).tril();
    m.row_empty = visible.logical_and(past).any(-1).logical_not();
  }
  return m;
}

SequenceForward sequence_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const SequenceMask& mask, double scale) {
  SequenceForward r;
  switch (choose_backend(q, mask)) {
    case SeqBackend::CpuFlash: {
      std::tie(r.out, r.lse) = at::_scaled_dot_product_flash_attention_for_cpu(
          q, k, v, /*dropout_p=*/0.0, mask.causal_flag, optional_of(mask.bias), scale);
      break;
    }
    case SeqBackend::CudaFlash: {
      auto res = at::_scaled_dot_product_flash_attention(q, k, v, /*dropout_p=*/0.0, mask.causal_flag,
                                                         /*return_debug_mask=*/false, scale);
      r.out = std::get<0>(res);
      r.lse = std::get<1>(res);
      break;
    }
    case SeqBackend::CudaEfficient: {
      const int64_t g = group_of(q, k);
      auto res = at::_scaled_dot_product_efficient_attention(
          q, expand_kv_heads(k, g), expand_kv_heads(v, g), optional_of(efficient_bias(mask.bias, q, k)),
          /*compute_log_sumexp=*/true, /*dropout_p=*/0.0, mask.causal_flag, scale);
      r.out = std::get<0>(res);
      r.lse = std::get<1>(res).narrow(2, 0, q.size(2));  // the kernel pads lse rows to 32
      break;
    }
    case SeqBackend::Math:
      r = math_forward(q, k, v, mask, scale);
      break;
  }
  if (mask.row_empty.defined()) r.lse.masked_fill_(mask.row_empty, kNegInf);
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const SequenceMask& mask, const at::Tensor& out, const at::Tensor& lse, double scale) {
  switch (choose_backend(q, mask)) {
    case SeqBackend::CpuFlash:
      return at::_scaled_dot_product_flash_attention_for_cpu_backward(
          grad_out, q, k, v, out, lse, /*dropout_p=*/0.0, mask.causal_flag, optional_of(mask.bias), scale);
    case SeqBackend::CudaFlash: {
      // Without dropout the kernel never reads its RNG state; these stand in for what forward returns.
      const auto rng_state = at::empty({2}, q.options().dtype(at::kUInt64));
      const auto unused = at::empty({}, q.options().dtype(at::kUInt64));
      return at::_scaled_dot_product_flash_attention_backward(
          grad_out, q, k, v, out, lse.contiguous(), /*cum_seq_q=*/at::Tensor(), /*cum_seq_k=*/at::Tensor(),
          q.size(2), k.size(2), /*dropout_p=*/0.0, mask.causal_flag, rng_state, unused, scale);
    }
    case SeqBackend::CudaEfficient: {
      const int64_t g = group_of(q, k), B = q.size(0), H = q.size(1), Sq = q.size(2);
      // The kernel reads lse in rows padded to 32 (as its forward wrote it) and out as [B, Sq, H, D].
      auto lse_padded = at::full({B, H, (Sq + 31) / 32 * 32}, std::numeric_limits<float>::infinity(),
                                 lse.options().dtype(at::kFloat));
      lse_padded.narrow(2, 0, Sq).copy_(lse);
      const auto out_bshd = out.transpose(1, 2).contiguous().transpose(1, 2);
      const auto seed = at::empty({}, at::TensorOptions().dtype(at::kLong));
      auto res = at::_scaled_dot_product_efficient_attention_backward(
          grad_out, q, expand_kv_heads(k, g), expand_kv_heads(v, g), efficient_bias(mask.bias, q, k), out_bshd,
          lse_padded, seed, seed, /*dropout_p=*/0.0, {true, true, true, false}, mask.causal_flag, scale);
      return {std::get<0>(res), reduce_kv_heads(std::get<1>(res), g), reduce_kv_heads(std::get<2>(res), g)};
    }
    case SeqBackend::Math:
      break;
  }
  return math_backward(grad_out, q, k, v, mask, out, lse, scale);
}

}  // namespace fastpeft
