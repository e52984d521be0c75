// Validation and the device-generic entry of the 4-bit dequantize op.
#include "quant4bit/quant4bit.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace fastpeft {

Quant4bitType parse_quant_type(const std::string& quant_type, const char* op) {
  if (quant_type == "nf4") return Quant4bitType::NF4;
  if (quant_type == "fp4") return Quant4bitType::FP4;
  TORCH_CHECK(false, op, ": quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
}

Quant4bitWeight make_quant4bit_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_code,
                                      const c10::optional<at::Tensor>& nested_offset,
                                      int64_t blocksize, int64_t nested_blocksize,
                                      Quant4bitType type, int64_t numel, const char* op) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in [32, 4096] (what bitsandbytes supports), got ",
              blocksize);
  check_dtype(packed, at::kByte, op, "packed", " (view other quant_storage dtypes as uint8)");
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed holds ", packed.numel(),
              " bytes but a weight of ", numel, " elements needs ", (numel + 1) / 2);
  TORCH_CHECK(absmax.numel() == blocks, op, ": absmax has ", absmax.numel(), " entries but ",
              numel, " elements in blocks of ", blocksize, " need ", blocks);
  check_same_device(absmax, packed, op, "absmax", "packed");

  Quant4bitWeight w;
  w.packed = packed.contiguous().view({-1});
  w.absmax = absmax.contiguous().view({-1});
  w.blocksize = blocksize;
  w.nested_blocksize = nested_blocksize;
  w.type = type;

  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  TORCH_CHECK(nested == (nested_code.has_value() && nested_code->defined()) &&
                  nested == (nested_offset.has_value() && nested_offset->defined()),
              op, ": nested_absmax, nested_code and nested_offset must be given together");
  if (!nested) {
    check_dtype(absmax, at::kFloat, op, "absmax", " when the absmax is not double-quantized");
    return w;
  }
  check_dtype(absmax, at::kByte, op, "absmax", " (codes) when nested_absmax is given");
  TORCH_CHECK(nested_blocksize > 0, op, ": nested_blocksize must be positive, got ", nested_blocksize);
  const int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
  check_dtype(*nested_absmax, at::kFloat, op, "nested_absmax");
  TORCH_CHECK(nested_absmax->numel() == nested_blocks, op, ": nested_absmax has ",
              nested_absmax->numel(), " entries but ", blocks, " absmax codes in blocks of ",
              nested_blocksize, " need ", nested_blocks);
  check_dtype(*nested_code, at::kFloat, op, "nested_code");
  TORCH_CHECK(nested_code->numel() == 256, op, ": nested_code must have 256 entries, got ",
              nested_code->numel());
  check_dtype(*nested_offset, at::kFloat, op, "nested_offset");
  TORCH_CHECK(nested_offset->numel() == 1, op, ": nested_offset must have one element, got ",
              nested_offset->numel());
  check_same_device(*nested_absmax, packed, op, "nested_absmax", "packed");
  check_same_device(*nested_code, packed, op, "nested_code", "packed");
  check_same_device(*nested_offset, packed, op, "nested_offset", "packed");
  w.nested_absmax = nested_absmax->contiguous().view({-1});
  w.nested_code = nested_code->contiguous().view({-1});
  w.nested_offset = nested_offset->contiguous().view({-1});
  return w;
}

void dequantize_4bit_into(const Quant4bitWeight& w, at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dequantize_4bit_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&,
                                   const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&, int64_t, int64_t,
                                   c10::string_view, at::Tensor&)>();
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  op.call(w.packed, w.absmax, opt(w.nested_absmax), opt(w.nested_code), opt(w.nested_offset),
          w.blocksize, w.nested_blocksize, w.type == Quant4bitType::NF4 ? "nf4" : "fp4", out);
}

void dequantize_4bit_scaled_into(const Quant4bitWeight& w, const at::Tensor& scale, int64_t scale_dim,
                                 at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft::dequantize_4bit_scaled_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&,
                                   const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&, int64_t, int64_t,
                                   c10::string_view, const at::Tensor&, int64_t, at::Tensor&)>();
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  op.call(w.packed, w.absmax, opt(w.nested_absmax), opt(w.nested_code), opt(w.nested_offset),
          w.blocksize, w.nested_blocksize, w.type == Quant4bitType::NF4 ? "nf4" : "fp4", scale,
          scale_dim, out);
}

namespace {

using DequantKernel = void (*)(const Quant4bitWeight&, at::Tensor&, const DequantScale&);

Quant4bitWeight checked_weight_for_out(const at::Tensor& packed, const at::Tensor& absmax,
                                       const c10::optional<at::Tensor>& nested_absmax,
                                       const c10::optional<at::Tensor>& nested_code,
                                       const c10::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                       int64_t nested_blocksize, c10::string_view quant_type,
                                       const at::Tensor& out, const char* op) {
  check_float(out, op, "out");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is the workspace the weight is written to)");
  check_same_device(out, packed, op, "out", "packed");
  return make_quant4bit_weight(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                               nested_blocksize, parse_quant_type(std::string(quant_type), op), out.numel(), op);
}

// The op's body on every device: validate, then run the device kernel into `out`.
template <DequantKernel Kernel>
void dequantize_4bit_(const at::Tensor& packed, const at::Tensor& absmax,
                      const c10::optional<at::Tensor>& nested_absmax,
                      const c10::optional<at::Tensor>& nested_code,
                      const c10::optional<at::Tensor>& nested_offset, int64_t blocksize,
                      int64_t nested_blocksize, c10::string_view quant_type, at::Tensor& out) {
  constexpr const char* op = "fastpeft.dequantize_4bit_";
  const auto w = checked_weight_for_out(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                        nested_blocksize, quant_type, out, op);
  if (out.numel() == 0) return;
  Kernel(w, out, DequantScale{});
}

// Dequantize with a row or column factor folded in (the (IA)^3 fusion for a single task).
template <DequantKernel Kernel>
void dequantize_4bit_scaled_(const at::Tensor& packed, const at::Tensor& absmax,
                             const c10::optional<at::Tensor>& nested_absmax,
                             const c10::optional<at::Tensor>& nested_code,
                             const c10::optional<at::Tensor>& nested_offset, int64_t blocksize,
                             int64_t nested_blocksize, c10::string_view quant_type, const at::Tensor& scale,
                             int64_t scale_dim, at::Tensor& out) {
  constexpr const char* op = "fastpeft.dequantize_4bit_scaled_";
  check_dim(out, 2, op, "out");
  TORCH_CHECK(scale_dim == 0 || scale_dim == 1, op, ": scale_dim must be 0 (scale rows) or 1 (scale columns), got ",
              scale_dim);
  check_float(scale, op, "scale");
  check_same_device(scale, out, op, "scale", "out");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == out.size(scale_dim), op, ": scale must be [", out.size(scale_dim),
              "] (dimension ", scale_dim, " of out ", out.sizes(), "), got ", scale.sizes());
  const auto w = checked_weight_for_out(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                        nested_blocksize, quant_type, out, op);
  if (out.numel() == 0) return;
  DequantScale s;
  s.factors = scale.to(at::kFloat).contiguous();
  s.mode = scale_dim == 0 ? DequantScaleMode::Rows : DequantScaleMode::Cols;
  s.cols = out.size(1);
  Kernel(w, out, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("dequantize_4bit_", &dequantize_4bit_<dequantize_4bit_cpu_kernel>);
  m.impl("dequantize_4bit_scaled_", &dequantize_4bit_scaled_<dequantize_4bit_cpu_kernel>);
}

#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("dequantize_4bit_", &dequantize_4bit_<dequantize_4bit_cuda_kernel>);
  m.impl("dequantize_4bit_scaled_", &dequantize_4bit_scaled_<dequantize_4bit_cuda_kernel>);
}
#endif

}  // namespace fastpeft
