// CPU dequantization of bitsandbytes int8 row-wise weights: out[o, k] = round((CB[o, k] * SCB[o]) / 127)
// in float32, then one rounding to out's dtype (see int8.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "int8/int8.h"

namespace fastpeft {

void dequantize_int8_rowwise_cpu_kernel(const Int8RowwiseWeight& w, at::Tensor& out) {
  const int64_t rows = w.data.size(0), cols = w.data.size(1);
  const int8_t* q = w.data.data_ptr<int8_t>();
  const float* s = w.scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_int8_rowwise_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float sr = s[r];
        const int8_t* qr = q + r * cols;
        scalar_t* orow = o + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          const float prod = static_cast<float>(qr[c]) * sr;  // rounded to float32 here
          orow[c] = static_cast<scalar_t>(prod / 127.0f);
        }
      }
    });
  });
}

}  // namespace fastpeft
