// Argument checks shared by every op. Each message names the argument, what was expected and
// what was given, so a user can fix the call without reading this code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastpeft {

// x [..., K] as [rows, K], rows the product of the leading sizes. Not reshape({-1, K}): with K = 0
// the -1 is ambiguous and reshape throws, though the layer is well defined (its sums are empty).
inline int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}
inline at::Tensor as_rows(const at::Tensor& x) { return x.reshape({leading_rows(x), x.size(-1)}); }

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op,
                        const std::string& name, const char* why = "") {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, why,
              ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const std::string& name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; move them to the same device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const std::string& name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

}  // namespace fastpeft
