// CPU kernels of multi-LoRA. Per adapter segment of the plan, the segment's rows are gathered into a
// small dense block (dropout applied while gathering), multiplied by MKL, and the result is
// scattered (or accumulated) back into the rows it belongs to. The loop over adapters runs here in
// C++; many small segments (decode-like batches) become parallel tasks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "multi_lora/multi_lora.h"

namespace fastpeft {
namespace {

struct Segment {
  int64_t adapter;
  int64_t len;
  const int32_t* rows;  // original row ids of the segment
};

// Rows per segment below which a segment is too small to keep every thread busy inside its own
// GEMMs, so segments run as parallel tasks instead.
constexpr int64_t kSmallSegmentRows = 64;

template <typename Fn>
void for_each_segment(const RowPlan& plan, const Fn& fn) {
  const int32_t* start = plan.offsets.data_ptr<int32_t>();  // offsets[0]: segment starts
  const int32_t* rows = plan.sorted_rows.data_ptr<int32_t>();
  std::vector<Segment> segments;
  for (int64_t a = 0; a < plan.num_adapters; ++a) {
    const int64_t len = start[a + 1] - start[a];
    if (len > 0) segments.push_back({a, len, rows + start[a]});
  }
  const int64_t n = static_cast<int64_t>(segments.size());
  if (n > 1 && start[plan.num_adapters] < kSmallSegmentRows * n) {
    // Inside at::parallel_for, ATen ops (the GEMMs too) run single-threaded: one segment per task.
    at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) fn(segments[s]);
    });
  } else {
    for (const auto& s : segments) fn(s);
  }
}

const DropoutMask* mask_of(const AdapterBank& bank, int64_t a) {
  return bank.any_dropout && bank.dropout[a].threshold > 0 ? &bank.dropout[a] : nullptr;
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols)); }

// dst[i * dst_stride + c] = scale * src[rows[i]][c] (times the dropout factor of that element of
// src), c < cols.
template <typename T>
void gather_rows(const T* src, int64_t src_cols, const int32_t* rows, int64_t n, int64_t cols, T* dst,
                 int64_t dst_stride, const DropoutMask* mask, float scale = 1.0f) {
  at::parallel_for(0, n, grain_rows(cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = int64_t(rows[i]) * src_cols;
      const T* s = src + base;
      T* d = dst + i * dst_stride;
      if (mask == nullptr && scale == 1.0f) {
        std::copy(s, s + cols, d);
      } else if (mask == nullptr) {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(scale * static_cast<float>(s[c]));
      } else {
        for (int64_t c = 0; c < cols; ++c)
          d[c] = static_cast<T>(scale * mask->factor(uint64_t(base + c)) * static_cast<float>(s[c]));
      }
    }
  });
}

// dst[rows[i]][c] = scale * src[i * src_stride + c], c < cols (dst rows have dst_cols entries).
template <typename T>
void scatter_rows(T* dst, int64_t dst_cols, const int32_t* rows, int64_t n, int64_t cols, const T* src,
                  int64_t src_stride, float scale) {
  at::parallel_for(0, n, grain_rows(cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* d = dst + int64_t(rows[i]) * dst_cols;
      const T* s = src + i * src_stride;
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(scale * static_cast<float>(s[c]));
    }
  });
}

// dst[rows[i]][c] += scale * src[i * src_stride + c] (times the dropout factor of that element of
// dst), in float32, rounded once. The two branches are separate loops so the common one (no
// dropout) vectorises.
template <typename T>
void add_rows(T* dst, int64_t cols, const int32_t* rows, int64_t n, const T* src, int64_t src_stride, float scale,
              const DropoutMask* mask) {
  at::parallel_for(0, n, grain_rows(cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = int64_t(rows[i]) * cols;
      T* d = dst + base;
      const T* s = src + i * src_stride;
      if (mask == nullptr) {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(static_cast<float>(d[c]) + scale * static_cast<float>(s[c]));
      } else {
        for (int64_t c = 0; c < cols; ++c)
          d[c] = static_cast<T>(static_cast<float>(d[c]) +
                                scale * mask->factor(uint64_t(base + c)) * static_cast<float>(s[c]));
      }
    }
  });
}

template <typename T>
at::Tensor gathered(const at::Tensor& src, const Segment& s, int64_t cols, const DropoutMask* mask = nullptr) {
  auto out = at::empty({s.len, cols}, src.options());
  gather_rows<T>(src.data_ptr<T>(), src.size(1), s.rows, s.len, cols, out.data_ptr<T>(), cols, mask);
  return out;
}

#define FASTPEFT_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor shrink_cpu(const at::Tensor& x, const AdapterBank& bank, const RowPlan& plan) {
  auto out = at::zeros({plan.rows, bank.max_rank}, x.options());
  FASTPEFT_DISPATCH_FLOAT(x.scalar_type(), "multi_lora_shrink_cpu", [&] {
    for_each_segment(plan, [&](const Segment& s) {
      const auto xa = gathered<scalar_t>(x, s, bank.in_features, mask_of(bank, s.adapter));
      const auto sa = at::mm(xa, bank.A[s.adapter].t());
      scatter_rows<scalar_t>(out.data_ptr<scalar_t>(), bank.max_rank, s.rows, s.len, bank.ranks[s.adapter],
                             sa.data_ptr<scalar_t>(), bank.ranks[s.adapter], 1.0f);
    });
  });
  return out;
}

void expand_cpu(at::Tensor& out, const at::Tensor& shrink, const AdapterBank& bank, const RowPlan& plan) {
  FASTPEFT_DISPATCH_FLOAT(out.scalar_type(), "multi_lora_expand_cpu", [&] {
    for_each_segment(plan, [&](const Segment& s) {
      const auto sa = gathered<scalar_t>(shrink, s, bank.ranks[s.adapter]);
      const auto delta = at::mm(sa, bank.B[s.adapter].t());
      add_rows<scalar_t>(out.data_ptr<scalar_t>(), bank.out_features, s.rows, s.len, delta.data_ptr<scalar_t>(),
                         bank.out_features, static_cast<float>(bank.scalings[s.adapter]), nullptr);
    });
  });
}

at::Tensor grad_shrink_cpu(const at::Tensor& grad_out, const AdapterBank& bank, const RowPlan& plan) {
  auto out = at::zeros({plan.rows, bank.max_rank}, grad_out.options());
  FASTPEFT_DISPATCH_FLOAT(grad_out.scalar_type(), "multi_lora_grad_shrink_cpu", [&] {
    for_each_segment(plan, [&](const Segment& s) {
      const auto ga = gathered<scalar_t>(grad_out, s, bank.out_features);
      const auto gsa = at::mm(ga, bank.B[s.adapter]);
      scatter_rows<scalar_t>(out.data_ptr<scalar_t>(), bank.max_rank, s.rows, s.len, bank.ranks[s.adapter],
                             gsa.data_ptr<scalar_t>(), bank.ranks[s.adapter], static_cast<float>(bank.scalings[s.adapter]));
    });
  });
  return out;
}

void grad_x_accum_cpu(at::Tensor& grad_x, const at::Tensor& grad_shrink, const AdapterBank& bank,
                      const RowPlan& plan) {
  FASTPEFT_DISPATCH_FLOAT(grad_x.scalar_type(), "multi_lora_grad_x_cpu", [&] {
    for_each_segment(plan, [&](const Segment& s) {
      const auto gsa = gathered<scalar_t>(grad_shrink, s, bank.ranks[s.adapter]);
      const auto delta = at::mm(gsa, bank.A[s.adapter]);
      add_rows<scalar_t>(grad_x.data_ptr<scalar_t>(), bank.in_features, s.rows, s.len, delta.data_ptr<scalar_t>(),
                         bank.in_features, 1.0f, mask_of(bank, s.adapter));
    });
  });
}

void grad_adapters_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrink,
                       const at::Tensor& grad_shrink, const AdapterBank& bank, const RowPlan& plan,
                       std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B) {
  // An adapter no row uses gets zeros (the segments below overwrite the others).
  for (size_t i = 0; i < bank.size(); ++i) {
    if (grad_A[i].defined()) grad_A[i].zero_();
    if (grad_B[i].defined()) grad_B[i].zero_();
  }
  FASTPEFT_DISPATCH_FLOAT(x.scalar_type(), "multi_lora_grad_adapters_cpu", [&] {
    for_each_segment(plan, [&](const Segment& s) {
      const int64_t a = s.adapter, r = bank.ranks[a];
      if (grad_A[a].defined()) {
        const auto xa = gathered<scalar_t>(x, s, bank.in_features, mask_of(bank, a));
        const auto gsa = gathered<scalar_t>(grad_shrink, s, r);
        at::mm_out(grad_A[a], gsa.t(), xa);
      }
      if (grad_B[a].defined()) {
        const auto ga = gathered<scalar_t>(grad_out, s, bank.out_features);
        const auto sa = gathered<scalar_t>(shrink, s, r);
        at::mm_out(grad_B[a], ga.t(), sa);
        grad_B[a].mul_(bank.scalings[a]);
      }
    });
  });
}

// ---- grouped layout (multi_lora_grouped.cpp) ----------------------------------------------------
// One adapter's segment at a time (its rows: sorted_rows[seg[a] ..], its layout rows from grp[a]),
// rows of a segment in parallel.

template <typename Fn>
void for_each_group(const RowPlan& plan, const Fn& fn) {
  const int32_t* seg = plan.offsets[0].data_ptr<int32_t>();
  const int32_t* grp = plan.offsets[2].data_ptr<int32_t>();
  const int32_t* rows = plan.sorted_rows.data_ptr<int32_t>();
  for (int64_t a = 0; a < plan.num_adapters; ++a) {
    const int64_t len = seg[a + 1] - seg[a];
    if (len > 0) fn(a, rows + seg[a], len, int64_t(grp[a]));
  }
}

at::Tensor grouped_gather_cpu(const at::Tensor& src, int64_t cols, const AdapterBank& bank, const RowPlan& plan,
                              bool dropout, bool scaled) {
  TORCH_CHECK(src.is_contiguous() && src.dim() == 2, "multi_lora grouped gather: src must be a contiguous matrix");
  auto out = at::zeros({plan.max_grouped_rows(), cols}, src.options());
  const int64_t src_cols = src.size(1), copy = std::min(cols, src_cols);
  FASTPEFT_DISPATCH_FLOAT(src.scalar_type(), "multi_lora_grouped_gather_cpu", [&] {
    for_each_group(plan, [&](int64_t a, const int32_t* rows, int64_t len, int64_t first) {
      gather_rows<scalar_t>(src.data_ptr<scalar_t>(), src_cols, rows, len, copy, out.data_ptr<scalar_t>() + first * cols,
                            cols, dropout ? mask_of(bank, a) : nullptr,
                            scaled ? static_cast<float>(bank.scalings[a]) : 1.0f);
    });
  });
  return out;
}

void grouped_scatter_cpu(at::Tensor& dst, const at::Tensor& src, const AdapterBank& bank, const RowPlan& plan,
                         bool accumulate, bool dropout, bool scaled) {
  TORCH_CHECK(dst.is_contiguous() && src.dim() == 2 && src.stride(1) == 1 && src.size(1) >= dst.size(1),
              "multi_lora grouped scatter: dst must be contiguous, src [P, >= ", dst.size(1), "] with unit column stride");
  const int64_t cols = dst.size(1), src_stride = src.stride(0);
  FASTPEFT_DISPATCH_FLOAT(dst.scalar_type(), "multi_lora_grouped_scatter_cpu", [&] {
    for_each_group(plan, [&](int64_t a, const int32_t* rows, int64_t len, int64_t first) {
      const scalar_t* s = src.data_ptr<scalar_t>() + first * src_stride;
      const float scale = scaled ? static_cast<float>(bank.scalings[a]) : 1.0f;
      if (accumulate) {
        add_rows<scalar_t>(dst.data_ptr<scalar_t>(), cols, rows, len, s, src_stride, scale,
                           dropout ? mask_of(bank, a) : nullptr);
      } else {
        scatter_rows<scalar_t>(dst.data_ptr<scalar_t>(), cols, rows, len, cols, s, src_stride, scale);
      }
    });
  });
}

}  // namespace

const MultiLoraGroupedKernels& multi_lora_grouped_cpu_kernels() {
  static const MultiLoraGroupedKernels kernels{grouped_gather_cpu, grouped_scatter_cpu};
  return kernels;
}

const MultiLoraKernels& multi_lora_cpu_kernels() {
  static const MultiLoraKernels kernels{shrink_cpu, expand_cpu, grad_shrink_cpu, grad_x_accum_cpu,
                                        grad_adapters_cpu};
  return kernels;
}

}  // namespace fastpeft
