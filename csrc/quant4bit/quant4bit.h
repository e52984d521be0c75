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

// Writes the dequantized weight into `out` (any float dtype; its numel is the weight's numel),
// through the dispatcher so the device's kernel runs.
void dequantize_4bit_into(const Quant4bitWeight& w, at::Tensor& out);

// Device kernels; `out` is contiguous and already validated.
void dequantize_4bit_cpu_kernel(const Quant4bitWeight& w, at::Tensor& out);
#ifdef FASTPEFT_WITH_CUDA
void dequantize_4bit_cuda_kernel(const Quant4bitWeight& w, at::Tensor& out);
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
