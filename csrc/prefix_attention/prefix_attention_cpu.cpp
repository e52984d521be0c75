// CPU kernels of the prefix part. Work is cut into blocks of at most kBlockRows query rows of one
// (example, head); a block's P prefix scores are a [rows, P] fp32 tile, multiplied with the bank
// through ATen's GEMM and transformed with ATen's vectorised elementwise kernels (both dispatch to
// the host's SIMD at run time). Nothing of size B x P or B x Sq x P exists; the temporaries are
// kBlockRows x max(P, D) per task, and the bank is converted to fp32 once per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include <algorithm>
#include <limits>
#include <vector>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int64_t kBlockRows = 256;

// OpenMP workers do not inherit the caller's dispatch state, so ATen calls inside at::parallel_for
// would go through autograd again; tasks run below it, like the kernel that launched them.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

int64_t set_of(const at::Tensor& prefix_index, int64_t b) {
  return prefix_index.defined() ? prefix_index.data_ptr<int64_t>()[b] : 0;
}

// Rows s0 .. s0 + n of (b, h) of a [B, H, S, ...] tensor: a view.
at::Tensor rows_of(const at::Tensor& t, int64_t b, int64_t h, int64_t s0, int64_t n) {
  return t.select(0, b).select(0, h).narrow(0, s0, n);
}

// The bank in fp32, [N, Hkv, P, D] each; detached, as nothing here is differentiated.
struct BankF32 {
  at::Tensor k, v;
  BankF32(const at::Tensor& prefix_k, const at::Tensor& prefix_v)
      : k(prefix_k.detach().to(at::kFloat).contiguous()), v(prefix_v.detach().to(at::kFloat).contiguous()) {}
};

template <typename T>
void merge_forward(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse, const BankF32& bank,
                   const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = bank.k.size(1), P = bank.k.size(2), group = H / Hkv;
  const int64_t blocks = (Sq + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * blocks), h = (t / blocks) % H, s0 = (t % blocks) * kBlockRows;
      const int64_t n = std::min(kBlockRows, Sq - s0);
      const auto keys = bank.k[set_of(prefix_index, b)][h / group];  // [P, D]
      const auto values = bank.v[set_of(prefix_index, b)][h / group];
      // The sequence part is the softmax state (m, l, acc) = (L1, 1, O1); fold the prefix in.
      const auto l1 = rows_of(seq_lse, b, h, s0, n).contiguous();
      const auto scores = at::mm(rows_of(q, b, h, s0, n).to(at::kFloat), keys.t()).mul_(scale);  // [n, P]
      const auto m = P > 0 ? at::maximum(scores.amax(1), l1) : l1.clone();
      const auto probs = scores.sub_(m.unsqueeze(1)).exp_();
      const auto prefix_sum = probs.sum(1);
      const auto prefix_out = at::mm(probs, values);  // [n, D], unnormalised
      const float *l1p = l1.data_ptr<float>(), *mp = m.data_ptr<float>(), *sum = prefix_sum.data_ptr<float>();
      const float* acc = prefix_out.data_ptr<float>();
      const T* o1_rows = static_cast<const T*>(seq_out.const_data_ptr()) + b * seq_out.stride(0) + h * seq_out.stride(1);
      T* out_rows = static_cast<T*>(out.data_ptr()) + b * out.stride(0) + h * out.stride(1);
      float* lse_rows = lse.data_ptr<float>() + (b * H + h) * Sq;  // contiguous [B, H, Sq]
      for (int64_t i = 0; i < n; ++i) {
        const T* o1 = o1_rows + (s0 + i) * seq_out.stride(2);
        T* o = out_rows + (s0 + i) * out.stride(2);  // may alias o1: each element is read first
        const float w1 = l1p[i] == kNegInf ? 0.0f : std::exp(l1p[i] - mp[i]);
        const float l = sum[i] + w1;
        if (l > 0.0f) {
          const float inv = 1.0f / l;
          for (int64_t d = 0; d < D; ++d) {
            const float seq = w1 > 0.0f ? w1 * static_cast<float>(o1[d]) : 0.0f;  // O1 may be NaN if unseen
            o[d] = static_cast<T>((seq + acc[i * D + d]) * inv);
          }
          lse_rows[s0 + i] = mp[i] + std::log(l);
        } else {  // no prefix and no visible key: the row is 0 with lse -inf
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(0.0f);
          lse_rows[s0 + i] = -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
              const BankF32& bank, const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
              at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2);
  const int64_t N = bank.k.size(0), Hkv = bank.k.size(1), P = bank.k.size(2), group = H / Hkv;
  const int64_t blocks = (Sq + kBlockRows - 1) / kBlockRows;
  auto delta = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));

  // p = exp(s - L) and ds = p * (dO . v - Delta) of a block against `keys` / `values`.
  auto terms = [&](const at::Tensor& q_scaled, const at::Tensor& dout, const at::Tensor& keys,
                   const at::Tensor& values, int64_t b, int64_t h, int64_t s0, int64_t n) {
    auto probs = at::mm(q_scaled, keys.t()).sub_(rows_of(lse, b, h, s0, n).unsqueeze(1)).exp_();
    auto ds = at::mm(dout, values.t()).sub_(rows_of(delta, b, h, s0, n).unsqueeze(1)).mul_(probs);
    return std::make_pair(probs, ds);
  };

  // Pass 1, over (b, h, row block): Delta = rowsum(dO * out); dq += scale * ds K.
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * blocks), h = (t / blocks) % H, s0 = (t % blocks) * kBlockRows;
      const int64_t n = std::min(kBlockRows, Sq - s0);
      const auto dout = rows_of(grad_out, b, h, s0, n).to(at::kFloat);
      rows_of(delta, b, h, s0, n).copy_((dout * rows_of(out, b, h, s0, n).to(at::kFloat)).sum(1));
      if (!grad_q.defined()) continue;
      const int64_t set = set_of(prefix_index, b);
      const auto keys = bank.k[set][h / group];
      const auto q_scaled = rows_of(q, b, h, s0, n).to(at::kFloat).mul(scale);
      const auto ds = terms(q_scaled, dout, keys, bank.v[set][h / group], b, h, s0, n).second;
      rows_of(grad_q, b, h, s0, n).add_(at::mm(ds, keys), scale);  // fp32 sum, rounded once
    }
  });
  if (!grad_prefix_k.defined()) return;  // the bank gradients come as a pair or not at all

  // Pass 2, over (set, kv head, block of prefix keys): each task owns its slice of the bank
  // gradients and sums over the rows of the examples that use its set (deterministic, no
  // atomics, no per-example copies). Keys are split only to give every thread work.
  std::vector<std::vector<int64_t>> examples_of(N);
  for (int64_t b = 0; b < B; ++b) examples_of[set_of(prefix_index, b)].push_back(b);
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(P, (2 * threads + N * Hkv - 1) / (N * Hkv)));
  const int64_t key_block = (P + splits - 1) / splits;
  const int64_t key_blocks = (P + key_block - 1) / key_block;
  at::parallel_for(0, N * Hkv * key_blocks, 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t set = t / (Hkv * key_blocks), head = (t / key_blocks) % Hkv, j0 = (t % key_blocks) * key_block;
      const int64_t nj = std::min(key_block, P - j0);
      const auto keys = bank.k[set][head].narrow(0, j0, nj), values = bank.v[set][head].narrow(0, j0, nj);
      auto grad_k = grad_prefix_k[set][head].narrow(0, j0, nj);  // zero-filled on entry
      auto grad_v = grad_prefix_v[set][head].narrow(0, j0, nj);
      for (const int64_t b : examples_of[set]) {
        for (int64_t h = head * group; h < (head + 1) * group; ++h) {
          for (int64_t s0 = 0; s0 < Sq; s0 += kBlockRows) {
            const int64_t n = std::min(kBlockRows, Sq - s0);
            const auto q_scaled = rows_of(q, b, h, s0, n).to(at::kFloat).mul(scale);
            const auto dout = rows_of(grad_out, b, h, s0, n).to(at::kFloat);
            const auto [probs, ds] = terms(q_scaled, dout, keys, values, b, h, s0, n);
            grad_k.addmm_(ds.t(), q_scaled);  // scale * ds^T q
            grad_v.addmm_(probs.t(), dout);
          }
        }
      }
    }
  });
}

}  // namespace

void prefix_merge_forward_cpu(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                              const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const BankF32 bank(prefix_k, prefix_v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_merge_forward_cpu", [&] {
    merge_forward<scalar_t>(q, seq_out, seq_lse, bank, prefix_index, scale, out, lse);
  });
}

void prefix_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                         const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                         at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  backward(grad_out, q, out, lse, BankF32(prefix_k, prefix_v), prefix_index, scale, grad_q, grad_prefix_k,
           grad_prefix_v);
}

}  // namespace fastpeft
