// CPU dequantization of bitsandbytes 4-bit weights, bit-exact with bitsandbytes, optionally with
// a row or column factor folded in (see DequantScale; (IA)^3) or a sparse delta added to listed
// elements before the rounding (sparse fine-tuning, see csrc/sparse_delta).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// One run of bytes to float32 (high nibble first): out[2i], out[2i+1] = code[nibble] * scale.
// The 16-entry code book sits in vector registers and each nibble is looked up with a register
// permute (vpermps), 16 or 8 values per instruction, instead of scalar table loads; the path is
// chosen once from the CPU this runs on (the extension is built for baseline x86-64). One float
// multiply per element, as in the scalar path: bit-exact with it and with bitsandbytes.
void dequantize_bytes_scalar(const uint8_t* packed, int64_t nbytes, const float* code, float scale, float* out) {
  for (int64_t i = 0; i < nbytes; ++i) {
    const uint8_t byte = packed[i];
    out[2 * i] = code[byte >> 4] * scale;
    out[2 * i + 1] = code[byte & 0xF] * scale;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The 16 nibbles of 8 bytes as bytes, in output order (hi0, lo0, hi1, lo1, ...), in the low and
// high halves of one 128-bit register.
__attribute__((target("sse2"))) inline __m128i nibbles_in_order(__m128i bytes) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_and_si128(bytes, mask);
  return _mm_unpacklo_epi8(hi, lo);  // 8 bytes -> 16 nibbles
}

// GCC 12 warns (-Wmaybe-uninitialized) inside its own _mm512_cvtepu8_epi32, whose pass-through
// operand is an intentionally undefined register; the warning is a known false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void dequantize_bytes_avx512(const uint8_t* packed, int64_t nbytes,
                                                                const float* code, float scale, float* out) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {  // 8 bytes -> 16 floats
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i));
    const __m512i idx = _mm512_cvtepu8_epi32(nibbles_in_order(bytes));
    _mm512_storeu_ps(out + 2 * i, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s));
  }
  dequantize_bytes_scalar(packed + i, nbytes - i, code, scale, out + 2 * i);
}
#pragma GCC diagnostic pop

__attribute__((target("avx2"))) void dequantize_bytes_avx2(const uint8_t* packed, int64_t nbytes, const float* code,
                                                           float scale, float* out) {
  const __m256 low8 = _mm256_loadu_ps(code), high8 = _mm256_loadu_ps(code + 8);
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i seven = _mm256_set1_epi32(7);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {  // 8 bytes -> 16 floats, as two halves of 8
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i));
    const __m128i nib = nibbles_in_order(bytes);
    for (int half = 0; half < 2; ++half) {
      const __m256i idx = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(nib, 8) : nib);
      const __m256 a = _mm256_permutevar8x32_ps(low8, idx), b = _mm256_permutevar8x32_ps(high8, idx);
      const __m256 pick_high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
      _mm256_storeu_ps(out + 2 * i + 8 * half, _mm256_mul_ps(_mm256_blendv_ps(a, b, pick_high), s));
    }
  }
  dequantize_bytes_scalar(packed + i, nbytes - i, code, scale, out + 2 * i);
}
#endif

using DequantBytesFn = void (*)(const uint8_t*, int64_t, const float*, float, float*);

// FASTPEFT_CPU_DEQUANT=avx512|avx2|scalar forces a path (the tests check each one bit for bit).
DequantBytesFn pick_dequantize_bytes() {
  const char* forced = std::getenv("FASTPEFT_CPU_DEQUANT");
  const std::string want = forced ? forced : "";
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f")) return dequantize_bytes_avx512;
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2"))
    return dequantize_bytes_avx2;
#endif
  return dequantize_bytes_scalar;
}

const DequantBytesFn dequantize_bytes_f32 = pick_dequantize_bytes();

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
        const int64_t pairs = (e1 - e0) / 2;
        if constexpr (std::is_same_v<T, float>) {
          dequantize_bytes_f32(packed + (e0 >> 1), pairs, code, scale, out + e0);
        } else {  // float32 values through a small buffer, then one rounding to T each
          constexpr int64_t kPairs = 256;
          float buf[2 * kPairs];
          for (int64_t p0 = 0; p0 < pairs; p0 += kPairs) {
            const int64_t n = std::min(kPairs, pairs - p0);
            dequantize_bytes_f32(packed + (e0 >> 1) + p0, n, code, scale, buf);
            T* dst = out + e0 + 2 * p0;
            for (int64_t j = 0; j < 2 * n; ++j) dst[j] = static_cast<T>(buf[j]);
          }
        }
        e += 2 * pairs;
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
