// CPU kernels of the rational activation (adaptable adapters): forward into the up GEMM's input,
// backward with the per-row coefficient gradients. One pass over the [M, r] tensors, rows split
// over threads; each row's 10 coefficients are loaded once into registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "adapter/adapter.h"
#include "adapter/adapter_rational.h"

namespace fastpeft {

namespace {

// Rows per parallel task: ~16k elements, so small bottlenecks still split into few tasks.
int64_t row_grain(int64_t r) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(r, 1)); }

template <typename acc_t>
struct CoeffRows {
  at::Tensor acc;  // [N, 10] in acc_t
  const int64_t* ids;
  int64_t rows_per_example;

  CoeffRows(const at::Tensor& coeffs, const TaskMap& banks)
      : acc(coeffs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous()),
        ids(banks.ids_ptr()),
        rows_per_example(std::max<int64_t>(banks.rows_per_example, 1)) {}

  void load(int64_t m, acc_t* c) const {
    const int64_t bank = ids ? ids[m / rows_per_example] : 0;
    const acc_t* src = acc.data_ptr<acc_t>() + bank * kRationalCoeffs;
    for (int k = 0; k < kRationalCoeffs; ++k) c[k] = src[k];
  }
};

}  // namespace

void adapter_rational_forward_cpu(const at::Tensor& z, const at::Tensor& coeffs, const TaskMap& banks,
                                  at::Tensor out) {
  const int64_t M = z.size(0), r = z.size(1), out_stride = out.stride(0);
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && out.stride(1) == 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_rational_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CoeffRows<acc_t> rows(coeffs, banks);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(r), [&](int64_t begin, int64_t end) {
      acc_t c[kRationalCoeffs];
      for (int64_t m = begin; m < end; ++m) {
        rows.load(m, c);
        const scalar_t* zr = zp + m * r;
        scalar_t* o = op + m * out_stride;
        for (int64_t k = 0; k < r; ++k) o[k] = static_cast<scalar_t>(rational_value<acc_t>(zr[k], c));
      }
    });
  });
}

at::Tensor adapter_rational_backward_cpu(at::Tensor& grad_a, const at::Tensor& z, const at::Tensor& coeffs,
                                         const TaskMap& banks) {
  const int64_t M = z.size(0), r = z.size(1);
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && grad_a.is_contiguous());
  at::Tensor row_grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "adapter_rational_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CoeffRows<acc_t> rows(coeffs, banks);
    row_grads = at::empty({M, kRationalCoeffs}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* gp = grad_a.data_ptr<scalar_t>();
    acc_t* rg = row_grads.data_ptr<acc_t>();
    at::parallel_for(0, M, row_grain(r), [&](int64_t begin, int64_t end) {
      acc_t c[kRationalCoeffs];
      for (int64_t m = begin; m < end; ++m) {
        rows.load(m, c);
        acc_t gc[kRationalCoeffs] = {};
        const scalar_t* zr = zp + m * r;
        scalar_t* g = gp + m * r;
        for (int64_t k = 0; k < r; ++k)
          g[k] = static_cast<scalar_t>(rational_backward<acc_t>(zr[k], static_cast<acc_t>(g[k]), c, gc));
        for (int k = 0; k < kRationalCoeffs; ++k) rg[m * kRationalCoeffs + k] = gc[k];
      }
    });
  });
  return row_grads;
}

}  // namespace fastpeft
