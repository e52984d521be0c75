// CPU kernels of the prefix part. Work is cut into blocks of at most kBlockRows query rows of one
// (example, kv-head group); a block's P prefix scores are a [rows, P] fp32 tile, multiplied with the bank
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
constexpr int64_t kBlockRows = 1024;  // query rows per task, over the heads of one kv group

// OpenMP workers do not inherit the caller's dispatch state, so ATen calls inside at::parallel_for
// would go through autograd again; tasks run below it, like the kernel that launched them.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

int64_t set_of(const at::Tensor& prefix_index, int64_t b) {
  return prefix_index.defined() ? prefix_index.data_ptr<int64_t>()[b] : 0;
}

// One task's rows: positions s0 .. s0 + n of the `group` query heads that share kv head `head`
// of example b. All of them attend to the same prefix set, so they form one GEMM operand.
struct RowBlock {
  int64_t b, head, group, s0, n;
  // The block of a [B, H, Sq, ...] tensor as a [group, n, ...] view.
  at::Tensor of(const at::Tensor& t) const { return t.select(0, b).narrow(0, head * group, group).narrow(1, s0, n); }
  // ... as a [group * n, ...] fp32 matrix. It may share memory with `t` (fp32 input): read only.
  at::Tensor f32(const at::Tensor& t) const {
    auto rows = of(t).to(at::kFloat);
    return t.dim() == 4 ? rows.reshape({group * n, t.size(3)}) : rows.reshape({group * n});
  }
};

// Tasks: every (example, kv head, block of positions).
struct RowBlocks {
  int64_t H, Hkv, Sq, group, positions, per_head;
  RowBlocks(const at::Tensor& q, int64_t Hkv)
      : H(q.size(1)), Hkv(Hkv), Sq(q.size(2)), group(q.size(1) / Hkv),
        positions(std::max<int64_t>(1, kBlockRows / group)), per_head((Sq + positions - 1) / positions) {}
  int64_t count(int64_t B) const { return B * Hkv * per_head; }
  RowBlock at(int64_t t) const {
    const int64_t s0 = (t % per_head) * positions;
    return {t / (Hkv * per_head), (t / per_head) % Hkv, group, s0, std::min(positions, Sq - s0)};
  }
};

// The bank in fp32, [N, Hkv, P, D] each; detached, as nothing here is differentiated.
struct BankF32 {
  at::Tensor k, v;
  BankF32(const at::Tensor& prefix_k, const at::Tensor& prefix_v)
      : k(prefix_k.detach().to(at::kFloat).contiguous()), v(prefix_v.detach().to(at::kFloat).contiguous()) {}
};

template <typename T>
void merge_forward(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse, const BankF32& bank,
                   const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), P = bank.k.size(2);
  const RowBlocks tasks(q, bank.k.size(1));
  at::parallel_for(0, tasks.count(B), 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const RowBlock blk = tasks.at(t);
      const int64_t set = set_of(prefix_index, blk.b), rows = blk.group * blk.n;
      const auto keys = bank.k[set][blk.head], values = bank.v[set][blk.head];  // [P, D]
      // The sequence part is the softmax state (m, l, acc) = (L1, 1, O1); fold the prefix in.
      const auto l1 = blk.f32(seq_lse).contiguous();
      const auto scores = at::mm(blk.f32(q), keys.t()).mul_(scale);  // [rows, P]
      const auto m = P > 0 ? at::maximum(scores.amax(1), l1) : l1.clone();
      const auto probs = scores.sub_(m.unsqueeze(1)).exp_();
      const auto prefix_sum = probs.sum(1);
      const auto prefix_out = at::mm(probs, values);  // [rows, D], unnormalised
      const float *l1p = l1.data_ptr<float>(), *mp = m.data_ptr<float>(), *sum = prefix_sum.data_ptr<float>();
      const float* acc = prefix_out.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = blk.head * blk.group + r / blk.n, s = blk.s0 + r % blk.n;
        const T* o1 = static_cast<const T*>(seq_out.const_data_ptr()) + blk.b * seq_out.stride(0) +
                      h * seq_out.stride(1) + s * seq_out.stride(2);
        T* o = static_cast<T*>(out.data_ptr()) + blk.b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
        float* row_lse = lse.data_ptr<float>() + (blk.b * H + h) * Sq + s;  // contiguous [B, H, Sq]
        // o may alias o1: each element is read before it is written.
        const float w1 = l1p[r] == kNegInf ? 0.0f : std::exp(l1p[r] - mp[r]);
        const float l = sum[r] + w1;
        if (l > 0.0f) {
          const float inv = 1.0f / l;
          for (int64_t d = 0; d < D; ++d) {
            const float seq = w1 > 0.0f ? w1 * static_cast<float>(o1[d]) : 0.0f;  // O1 may be NaN if unseen
            o[d] = static_cast<T>((seq + acc[r * D + d]) * inv);
          }
          *row_lse = mp[r] + std::log(l);
        } else {  // no prefix and no visible key: the row is 0 with lse -inf
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(0.0f);
          *row_lse = -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
              const BankF32& bank, const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
              at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const int64_t B = q.size(0);
  const int64_t N = bank.k.size(0), Hkv = bank.k.size(1), P = bank.k.size(2);
  const RowBlocks tasks(q, Hkv);
  auto delta = at::empty({B, q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  // p = exp(s - L) and ds = p * (dO . v - Delta) of a block against `keys` / `values`.
  auto terms = [&](const RowBlock& blk, const at::Tensor& q_scaled, const at::Tensor& dout, const at::Tensor& keys,
                   const at::Tensor& values) {
    auto probs = at::mm(q_scaled, keys.t()).sub_(blk.f32(lse).unsqueeze(1)).exp_();
    auto ds = at::mm(dout, values.t()).sub_(blk.f32(delta).unsqueeze(1)).mul_(probs);
    return std::make_pair(probs, ds);
  };

  // Pass 1, over row blocks: Delta = rowsum(dO * out); dq += scale * ds K.
  at::parallel_for(0, tasks.count(B), 1, [&](int64_t t0, int64_t t1) {
    const BelowAutograd below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const RowBlock blk = tasks.at(t);
      const auto dout = blk.f32(grad_out);
      blk.of(delta).copy_((dout * blk.f32(out)).sum(1).view({blk.group, blk.n}));
      if (!grad_q.defined()) continue;
      const int64_t set = set_of(prefix_index, blk.b);
      const auto keys = bank.k[set][blk.head];
      const auto ds = terms(blk, blk.f32(q).mul(scale), dout, keys, bank.v[set][blk.head]).second;
      blk.of(grad_q).add_(at::mm(ds, keys).view({blk.group, blk.n, -1}), scale);  // fp32 sum, rounded once
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
        for (int64_t s0 = 0; s0 < tasks.Sq; s0 += tasks.positions) {
          const RowBlock blk{b, head, tasks.group, s0, std::min(tasks.positions, tasks.Sq - s0)};
          const auto q_scaled = blk.f32(q).mul(scale);
          const auto dout = blk.f32(grad_out);
          const auto [probs, ds] = terms(blk, q_scaled, dout, keys, values);
          grad_k.addmm_(ds.t(), q_scaled);  // scale * ds^T q
          grad_v.addmm_(probs.t(), dout);
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
