// CPU kernels of the prefix part. P is small, so a query row's P prefix scores fit in a local
// buffer: nothing of size B x P (or B x Sq x P) is ever allocated.
//
// The prefix bank is converted once to fp32 in two layouts, K^T [N, Hkv, D, P] and V [N, Hkv, P, D]
// (bank-sized, independent of the batch), so every inner loop is an axpy over contiguous floats
// that the compiler vectorises without reassociating a reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "prefix_attention/prefix_attention.h"

namespace fastpeft {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Element (b, h, s, d) of a [B, H, S, D] tensor whose last dim is contiguous.
template <typename T>
struct RowsOf {
  T* data;
  int64_t sb, sh, ss;
  explicit RowsOf(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t s) const { return data + b * sb + h * sh + s * ss; }
};

struct LseOf {
  float* data;
  int64_t sb, sh, ss;
  explicit LseOf(const at::Tensor& t)
      : data(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  float& at(int64_t b, int64_t h, int64_t s) const { return data[b * sb + h * sh + s * ss]; }
};

// The prefix bank in fp32: for set n and kv head h, kt is K^T [D, P], k is K [P, D], v is V [P, D].
struct BankF32 {
  at::Tensor k, kt, v;
  int64_t P, D;
  BankF32(const at::Tensor& prefix_k, const at::Tensor& prefix_v)
      : k(prefix_k.to(at::kFloat).contiguous()),
        kt(k.transpose(2, 3).contiguous()),
        v(prefix_v.to(at::kFloat).contiguous()),
        P(prefix_k.size(2)),
        D(prefix_k.size(3)) {}
  const float* k_t(int64_t set, int64_t head, int64_t Hkv) const {
    return kt.data_ptr<float>() + (set * Hkv + head) * D * P;
  }
  const float* keys(int64_t set, int64_t head, int64_t Hkv) const {
    return k.data_ptr<float>() + (set * Hkv + head) * P * D;
  }
  const float* values(int64_t set, int64_t head, int64_t Hkv) const {
    return v.data_ptr<float>() + (set * Hkv + head) * P * D;
  }
};

int64_t set_of(const at::Tensor& prefix_index, int64_t b) {
  return prefix_index.defined() ? prefix_index.data_ptr<int64_t>()[b] : 0;
}

// out[j] = sum_d x[d] * mat_t[d][j], j < n: a [D] row times a [D, n] block with row stride ld.
void row_times(const float* x, const float* mat_t, int64_t D, int64_t n, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float xd = x[d];
    const float* m = mat_t + d * ld;
    for (int64_t j = 0; j < n; ++j) out[j] += xd * m[j];
  }
}

template <typename T>
void load_row(const T* src, int64_t D, float* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <typename T>
void merge_forward(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse, const BankF32& bank,
                   const at::Tensor& prefix_index, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = bank.kt.size(1), P = bank.P, group = H / Hkv;
  const RowsOf<T> Q(q), O1(seq_out), O(out);
  const LseOf L1(seq_lse), L(lse);
  at::parallel_for(0, B * H * Sq, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> qf(D), acc(D), score(P);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * Sq), h = (r / Sq) % H, s = r % Sq;
      const int64_t set = set_of(prefix_index, b), head = h / group;
      load_row(Q.row(b, h, s), D, qf.data());
      for (auto& x : qf) x *= scale;
      row_times(qf.data(), bank.k_t(set, head, Hkv), D, P, P, score.data());

      // Running softmax state of the sequence part: (m, l, acc) = (L1, 1, O1), or empty.
      const float l1 = L1.at(b, h, s);
      float m = l1;
      for (int64_t j = 0; j < P; ++j) m = std::max(m, score[j]);
      float l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (l1 != kNegInf) {
        const float w = std::exp(l1 - m);
        const T* o1 = O1.row(b, h, s);
        for (int64_t d = 0; d < D; ++d) acc[d] = w * static_cast<float>(o1[d]);
        l = w;
      }
      const float* vals = bank.values(set, head, Hkv);
      for (int64_t j = 0; j < P; ++j) {
        const float p = std::exp(score[j] - m);
        l += p;
        const float* vj = vals + j * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
      }
      T* o = O.row(b, h, s);  // may alias seq_out's row, which was fully read above
      if (l > 0.0f) {
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
        L.at(b, h, s) = m + std::log(l);
      } else {  // no prefix and no visible key: define the row as 0 with lse -inf
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(0.0f);
        L.at(b, h, s) = kNegInf;
      }
    }
  });
}

// One query row's prefix terms for keys [j0, j0 + n): p = exp(s - L) and ds = p * (dO.v - Delta).
struct RowTerms {
  std::vector<float> p, ds;
  explicit RowTerms(int64_t n) : p(n), ds(n) {}
  void compute(const float* q_scaled, const float* dout, const float* k_t, const float* v_t, int64_t D,
               int64_t n, int64_t ld, float row_lse, float delta) {
    row_times(q_scaled, k_t, D, n, ld, p.data());
    row_times(dout, v_t, D, n, ld, ds.data());
    for (int64_t j = 0; j < n; ++j) {
      p[j] = row_lse == kNegInf ? 0.0f : std::exp(p[j] - row_lse);
      ds[j] = p[j] * (ds[j] - delta);
    }
  }
};

template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
              const BankF32& bank, const at::Tensor& prefix_index, float scale, at::Tensor& grad_q,
              at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = bank.kt.size(1), P = bank.P, N = bank.kt.size(0), group = H / Hkv;
  const RowsOf<T> Q(q), O(out), dO(grad_out);
  const LseOf L(lse);
  // V^T [N, Hkv, D, P] for the dO.v products.
  const auto v_t = bank.v.transpose(2, 3).contiguous();
  const float* vt_data = v_t.data_ptr<float>();
  auto delta = at::empty({B * H * Sq}, q.options().dtype(at::kFloat));
  float* delta_data = delta.data_ptr<float>();

  // Pass 1, over query rows: Delta = dO . out, and dq += scale * sum_j ds_j k_j.
  const bool need_q = grad_q.defined();
  const RowsOf<T> dQ(need_q ? grad_q : q);
  at::parallel_for(0, B * H * Sq, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> qf(D), df(D), dq(D);
    RowTerms terms(P);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * Sq), h = (r / Sq) % H, s = r % Sq;
      load_row(dO.row(b, h, s), D, df.data());
      const T* o = O.row(b, h, s);
      float dl = 0.0f;
      for (int64_t d = 0; d < D; ++d) dl += df[d] * static_cast<float>(o[d]);
      delta_data[r] = dl;
      if (!need_q) continue;
      const int64_t set = set_of(prefix_index, b), head = h / group;
      load_row(Q.row(b, h, s), D, qf.data());
      for (auto& x : qf) x *= scale;
      terms.compute(qf.data(), df.data(), bank.k_t(set, head, Hkv), vt_data + (set * Hkv + head) * D * P, D, P, P,
                    L.at(b, h, s), dl);
      std::fill(dq.begin(), dq.end(), 0.0f);
      const float* keys = bank.keys(set, head, Hkv);
      for (int64_t j = 0; j < P; ++j) {
        const float dsj = terms.ds[j];
        const float* kj = keys + j * D;
        for (int64_t d = 0; d < D; ++d) dq[d] += dsj * kj[d];
      }
      T* gq = dQ.row(b, h, s);
      for (int64_t d = 0; d < D; ++d) gq[d] = static_cast<T>(static_cast<float>(gq[d]) + scale * dq[d]);
    }
  });
  if (!grad_prefix_k.defined()) return;  // the bank gradients come as a pair or not at all

  // Pass 2, over (set, kv head, block of prefix keys): each task owns its slice of the bank
  // gradients and sums over the rows of the examples that use its set, so no atomics and no
  // per-example copies. Blocks are sized to give every thread a few tasks.
  std::vector<std::vector<int64_t>> examples_of(N);
  for (int64_t b = 0; b < B; ++b) examples_of[set_of(prefix_index, b)].push_back(b);
  const int64_t threads = at::get_num_threads();
  const int64_t wanted_blocks = std::max<int64_t>(1, (4 * threads + N * Hkv - 1) / (N * Hkv));
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(P, (P + wanted_blocks - 1) / wanted_blocks));
  const int64_t blocks = (P + block - 1) / block;
  float* gk = grad_prefix_k.data_ptr<float>();
  float* gv = grad_prefix_v.data_ptr<float>();
  at::parallel_for(0, N * Hkv * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(D), df(D), acc_k(block * D), acc_v(block * D);
    RowTerms terms(block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t set = t / (Hkv * blocks), head = (t / blocks) % Hkv, j0 = (t % blocks) * block;
      const int64_t n = std::min(block, P - j0);
      std::fill(acc_k.begin(), acc_k.end(), 0.0f);
      std::fill(acc_v.begin(), acc_v.end(), 0.0f);
      const float* k_t = bank.k_t(set, head, Hkv) + j0;
      const float* v_t_blk = vt_data + (set * Hkv + head) * D * P + j0;
      for (const int64_t b : examples_of[set]) {
        for (int64_t h = head * group; h < (head + 1) * group; ++h) {
          for (int64_t s = 0; s < Sq; ++s) {
            load_row(Q.row(b, h, s), D, qf.data());
            load_row(dO.row(b, h, s), D, df.data());
            for (auto& x : qf) x *= scale;
            terms.compute(qf.data(), df.data(), k_t, v_t_blk, D, n, P, L.at(b, h, s), delta_data[(b * H + h) * Sq + s]);
            // The row's contribution: dK_j += ds_j * scale * q (qf already holds scale * q).
            for (int64_t j = 0; j < n; ++j) {
              float* ak = acc_k.data() + j * D;
              float* av = acc_v.data() + j * D;
              const float dsj = terms.ds[j], pj = terms.p[j];
              for (int64_t d = 0; d < D; ++d) {
                ak[d] += dsj * qf[d];
                av[d] += pj * df[d];
              }
            }
          }
        }
      }
      const int64_t base = ((set * Hkv + head) * P + j0) * D;
      std::copy(acc_k.begin(), acc_k.begin() + n * D, gk + base);
      std::copy(acc_v.begin(), acc_v.begin() + n * D, gv + base);
    }
  });
}

}  // namespace

void prefix_merge_forward_cpu(const at::Tensor& q, const at::Tensor& seq_out, const at::Tensor& seq_lse,
                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                              const at::Tensor& prefix_index, double scale, at::Tensor& out, at::Tensor& lse) {
  const BankF32 bank(prefix_k, prefix_v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_merge_forward_cpu", [&] {
    merge_forward<scalar_t>(q, seq_out, seq_lse, bank, prefix_index, static_cast<float>(scale), out, lse);
  });
}

void prefix_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                         const at::Tensor& prefix_index, double scale, at::Tensor& grad_q,
                         at::Tensor& grad_prefix_k, at::Tensor& grad_prefix_v) {
  const BankF32 bank(prefix_k, prefix_v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_backward_cpu", [&] {
    backward<scalar_t>(grad_out, q, out, lse, bank, prefix_index, static_cast<float>(scale), grad_q, grad_prefix_k,
                       grad_prefix_v);
  });
}

}  // namespace fastpeft
