// CPU dequantization of bitsandbytes 4-bit weights, bit-exact with bitsandbytes, optionally with
// a row or column factor folded in (see DequantScale; (IA)^3) or a sparse delta added to listed
// elements before the rounding (sparse fine-tuning, see csrc/sparse_delta).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "quant4bit/quant4bit.h"

namespace fastpeft {
namespace {

// The float32 scale of each block, with bitsandbytes' rounding for double-quantized absmax.
struct BlockScales {
  const float* absmax_f = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nbs = 256;

  explicit BlockScales(const Quant4bitWeight& w) : nbs(w.nested_blocksize) {
    if (w.nested()) {
      absmax_q = w.absmax.data_ptr<uint8_t>();
      nested_absmax = w.nested_absmax.data_ptr<float>();
      nested_code = w.nested_code.data_ptr<float>();
      offset = w.nested_offset.item<float>();
    } else {
      absmax_f = w.absmax.data_ptr<float>();
    }
  }

  float operator()(int64_t b) const {
    if (absmax_f != nullptr) return absmax_f[b];
    // Two roundings, in this order, as bitsandbytes does (dequantize_blockwise, then += offset).
    const float s = nested_code[absmax_q[b]] * nested_absmax[b / nbs];
    return s + offset;
  }
};

// Adds the delta entries that fall in elements [e0, e1), recomputing each element's float32
// value so it is rounded once: out[e] = T(code * scale + value).
template <typename T, typename Index>
void add_delta_range(const Quant4bitDelta& delta, const uint8_t* packed, const float* code, const BlockScales& scale,
                     int64_t bs, int64_t numel, int64_t e0, int64_t e1, T* out) {
  const Index* idx = delta.indices.data_ptr<Index>();
  const float* values = delta.values.data_ptr<float>();
  const int64_t k = delta.indices.numel();
  int64_t j = std::lower_bound(idx, idx + k, static_cast<Index>(e0)) - idx;
  for (; j < k && static_cast<int64_t>(idx[j]) < e1; ++j) {
    const int64_t e = idx[j];
    if (e < 0 || e >= numel) continue;
    const uint8_t byte = packed[e >> 1];
    const float q = code[(e & 1) ? (byte & 0xF) : (byte >> 4)];
    out[e] = static_cast<T>(q * scale(e / bs) + values[j]);
  }
}

// Walks elements in row-major order, tracking the row and column without a division per element.
struct RowColCursor {
  int64_t row, col, cols;
  RowColCursor(int64_t e, int64_t cols_) : row(e / cols_), col(e % cols_), cols(cols_) {}
  void next() {
    if (++col == cols) {
      col = 0;
      ++row;
    }
  }
};

template <typename T, DequantScaleMode Mode>
void dequantize_blocks(const Quant4bitWeight& w, T* out, int64_t numel, const DequantScale& fold,
                       const Quant4bitDelta* delta) {
  TORCH_INTERNAL_ASSERT(delta == nullptr || Mode == DequantScaleMode::None, "a delta and a scale fold together");
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const float* code = quant4bit_code(w.type);
  const int64_t bs = w.blocksize;
  const int64_t blocks = (numel + bs - 1) / bs;
  const BlockScales scale_of(w);
  const float* factors = Mode == DequantScaleMode::None ? nullptr : fold.factors.data_ptr<float>();

  // ~64 KiB of output per task keeps the thread pool busy without per-block overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / bs);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = scale_of(b);
      const int64_t e0 = b * bs;
      const int64_t e1 = std::min(numel, e0 + bs);
      if (Mode == DequantScaleMode::None) {
        // e0 is even (bs is), so elements come in (high nibble, low nibble) pairs of one byte.
        int64_t e = e0;
        for (; e + 1 < e1; e += 2) {
          const uint8_t byte = packed[e >> 1];
          out[e] = static_cast<T>(code[byte >> 4] * scale);
          out[e + 1] = static_cast<T>(code[byte & 0xF] * scale);
        }
        if (e < e1) out[e] = static_cast<T>(code[packed[e >> 1] >> 4] * scale);
      } else {
        RowColCursor at(e0, fold.cols);
        for (int64_t e = e0; e < e1; ++e, at.next()) {
          const uint8_t byte = packed[e >> 1];
          const float v = code[(e & 1) ? (byte & 0xF) : (byte >> 4)] * scale;
          const float f = factors[Mode == DequantScaleMode::Rows ? at.row : at.col];
          out[e] = static_cast<T>(v * f);  // -ffp-contract=off keeps the two roundings apart
        }
      }
    }
    if (delta == nullptr) return;
    // While this task's output is still in cache, overwrite its delta elements.
    const int64_t e0 = b0 * bs, e1 = std::min(numel, b1 * bs);
    if (delta->indices.scalar_type() == at::kInt) {
      add_delta_range<T, int32_t>(*delta, packed, code, scale_of, bs, numel, e0, e1, out);
    } else {
      add_delta_range<T, int64_t>(*delta, packed, code, scale_of, bs, numel, e0, e1, out);
    }
  });
}

}  // namespace

void dequantize_4bit_cpu_kernel(const Quant4bitWeight& w, at::Tensor& out, const DequantScale& scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_cpu", [&] {
    scalar_t* ptr = out.data_ptr<scalar_t>();
    switch (scale.mode) {
      case DequantScaleMode::None:
        dequantize_blocks<scalar_t, DequantScaleMode::None>(w, ptr, out.numel(), scale, nullptr);
        break;
      case DequantScaleMode::Rows:
        dequantize_blocks<scalar_t, DequantScaleMode::Rows>(w, ptr, out.numel(), scale, nullptr);
        break;
      case DequantScaleMode::Cols:
        dequantize_blocks<scalar_t, DequantScaleMode::Cols>(w, ptr, out.numel(), scale, nullptr);
        break;
    }
  });
}

void dequantize_4bit_add_delta_cpu_kernel(const Quant4bitWeight& w, const Quant4bitDelta& delta, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_add_delta_cpu", [&] {
    dequantize_blocks<scalar_t, DequantScaleMode::None>(w, out.data_ptr<scalar_t>(), out.numel(), DequantScale{},
                                                        &delta);
  });
}

}  // namespace fastpeft
