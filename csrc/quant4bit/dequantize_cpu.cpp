// CPU dequantization of bitsandbytes 4-bit weights, bit-exact with bitsandbytes, optionally with
// a row or column factor folded in (see DequantScale).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "quant4bit/quant4bit.h"

namespace fastpeft {
namespace {

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
void dequantize_blocks(const Quant4bitWeight& w, T* out, int64_t numel, const DequantScale& fold) {
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const float* code = quant4bit_code(w.type);
  const int64_t bs = w.blocksize;
  const int64_t blocks = (numel + bs - 1) / bs;

  const bool nested = w.nested();
  const float* absmax_f = nested ? nullptr : w.absmax.data_ptr<float>();
  const uint8_t* absmax_q = nested ? w.absmax.data_ptr<uint8_t>() : nullptr;
  const float* nested_absmax = nested ? w.nested_absmax.data_ptr<float>() : nullptr;
  const float* nested_code = nested ? w.nested_code.data_ptr<float>() : nullptr;
  const float offset = nested ? w.nested_offset.item<float>() : 0.0f;
  const int64_t nbs = w.nested_blocksize;
  const float* factors = Mode == DequantScaleMode::None ? nullptr : fold.factors.data_ptr<float>();

  // ~64 KiB of output per task keeps the thread pool busy without per-block overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / bs);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float scale;
      if (nested) {
        // Two roundings, in this order, as bitsandbytes does (dequantize_blockwise, then += offset).
        const float s = nested_code[absmax_q[b]] * nested_absmax[b / nbs];
        scale = s + offset;
      } else {
        scale = absmax_f[b];
      }
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
  });
}

}  // namespace

void dequantize_4bit_cpu_kernel(const Quant4bitWeight& w, at::Tensor& out, const DequantScale& scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_cpu", [&] {
    scalar_t* ptr = out.data_ptr<scalar_t>();
    switch (scale.mode) {
      case DequantScaleMode::None:
        dequantize_blocks<scalar_t, DequantScaleMode::None>(w, ptr, out.numel(), scale);
        break;
      case DequantScaleMode::Rows:
        dequantize_blocks<scalar_t, DequantScaleMode::Rows>(w, ptr, out.numel(), scale);
        break;
      case DequantScaleMode::Cols:
        dequantize_blocks<scalar_t, DequantScaleMode::Cols>(w, ptr, out.numel(), scale);
        break;
    }
  });
}

}  // namespace fastpeft
