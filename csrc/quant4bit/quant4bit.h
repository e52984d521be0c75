// bitsandbytes 4-bit weights (NF4 / FP4, optionally with double-quantized absmax) as plain tensors.
//
// Layout, as bitsandbytes writes it: element e of the row-major weight lives in byte e/2 of
// `packed` (high nibble for even e, low nibble for odd e); its scale is absmax[e / blocksize].
// When nested, absmax is itself uint8 codes: scale_b = nested_code[absmax[b]] *
// nested_absmax[b / nested_blocksize] + nested_offset, rounded after each operation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "common/quant4bit_codes.h"

namespace fastpeft {

struct Quant4bitWeight {
  at::Tensor packed;  // uint8 [ceil(numel / 2)]
  at::Tensor absmax;  // float32 [blocks], or uint8 [blocks] when nested
  at::Tensor nested_absmax;  // float32 [ceil(blocks / nested_blocksize)], undefined if not nested
  at::Tensor nested_code;    // float32 [256], undefined if not nested
  at::Tensor nested_offset;  // float32 [1], undefined if not nested
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
  Quant4bitType type = Quant4bitType::NF4;

  bool nested() const { return nested_absmax.defined(); }
};

Quant4bitType parse_quant_type(const std::string& quant_type, const char* op);

// Validates every field against a weight of `numel` elements on `device`; names the bad argument.
Quant4bitWeight make_quant4bit_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_code,
                                      const c10::optional<at::Tensor>& nested_offset,
                                      int64_t blocksize, int64_t nested_blocksize,
                                      Quant4bitType type, int64_t numel, const char* op);

// An optional per-row or per-column factor folded into the dequantization, so that scaling the
// weight (an (IA)^3 vector: diag(l) W or W diag(l)) costs no extra pass over it. The element is
// computed as code * absmax, then * factor, both rounded in float32, then rounded once to the
// output dtype: bit-exact with dequantizing to float32, multiplying, and casting.
enum class DequantScaleMode : int { None = 0, Rows = 1, Cols = 2 };

struct DequantScale {
  at::Tensor factors;  // float32, contiguous: [rows] for Rows, [cols] for Cols; undefined for None
  DequantScaleMode mode = DequantScaleMode::None;
  int64_t cols = 1;  // the weight's row length, to find an element's row and column
};

// Writes the dequantized weight into `out` (any float dtype; its numel is the weight's numel),
// through the dispatcher so the device's kernel runs.
void dequantize_4bit_into(const Quant4bitWeight& w, at::Tensor& out);

// The same with `scale` [rows] (scale_dim 0) or [cols] (scale_dim 1) folded in; `out` is the 2-D
// [rows, cols] weight buffer.
void dequantize_4bit_scaled_into(const Quant4bitWeight& w, const at::Tensor& scale, int64_t scale_dim,
                                 at::Tensor& out);

// Device kernels; `out` is contiguous and already validated.
void dequantize_4bit_cpu_kernel(const Quant4bitWeight& w, at::Tensor& out, const DequantScale& scale);
#ifdef FASTPEFT_WITH_CUDA
void dequantize_4bit_cuda_kernel(const Quant4bitWeight& w, at::Tensor& out, const DequantScale& scale);
#endif

// A sparse delta added while dequantizing (sparse fine-tuning on a 4-bit base): element
// indices[j] becomes round(code * scale + values[j]), one rounding to out's dtype, like the plain
// dequantization. indices: sorted, unique, contiguous int32/int64; values: contiguous float32.
// Indices outside the weight are skipped.
struct Quant4bitDelta {
  at::Tensor indices;
  at::Tensor values;
};
void dequantize_4bit_add_delta_cpu_kernel(const Quant4bitWeight& w, const Quant4bitDelta& delta, at::Tensor& out);
#ifdef FASTPEFT_WITH_CUDA
void dequantize_4bit_add_delta_cuda_kernel(const Quant4bitWeight& w, const Quant4bitDelta& delta, at::Tensor& out);
#endif

}  // namespace fastpeft
