// CPU kernels for the dropout-fused LoRA pieces. They walk x in row chunks of ~1 MiB: a chunk of
// dropped x (or of the LoRA input gradient) is built in a small reused buffer and fed to MKL's
// GEMM, so the M x K dropped tensor and its mask never exist; extra memory is one chunk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/dropout_elementwise_cpu.h"
#include "lora/lora.h"

namespace fastpeft {
namespace {

int64_t rows_per_chunk(int64_t cols, int64_t elem_size) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, cols * elem_size));
}

}  // namespace

at::Tensor lora_shrink_dropout_cpu(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask) {
  const int64_t M = x.size(0), K = x.size(1);
  auto out = at::empty({M, lora_A.size(0)}, x.options());
  const int64_t rows = std::min(M, rows_per_chunk(K, x.element_size()));
  auto chunk = at::empty({rows, K}, x.options());
  const auto At = lora_A.t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_dropout_cpu", [&] {
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t len = std::min(rows, M - m0);
      auto dropped = chunk.narrow(0, 0, len);
      apply_dropout(x.data_ptr<scalar_t>() + m0 * K, dropped.data_ptr<scalar_t>(), len * K, uint64_t(m0 * K), mask);
      auto out_rows = out.narrow(0, m0, len);
      at::mm_out(out_rows, dropped, At);
    }
  });
  return out;
}

at::Tensor lora_grad_A_dropout_cpu(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask) {
  const int64_t M = x.size(0), K = x.size(1);
  // Chunk partial products are summed in float32 so bf16/fp16 do not lose bits across chunks.
  auto acc = at::zeros({grad_shrink.size(1), K}, x.options().dtype(at::kFloat));
  const int64_t rows = std::min(M, rows_per_chunk(K, x.element_size()));
  auto chunk = at::empty({rows, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_grad_A_dropout_cpu", [&] {
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t len = std::min(rows, M - m0);
      auto dropped = chunk.narrow(0, 0, len);
      apply_dropout(x.data_ptr<scalar_t>() + m0 * K, dropped.data_ptr<scalar_t>(), len * K, uint64_t(m0 * K), mask);
      const auto g_rows_t = grad_shrink.narrow(0, m0, len).t();
      if (x.scalar_type() == at::kFloat) {
        acc.addmm_(g_rows_t, dropped);
      } else {
        acc.add_(at::mm(g_rows_t, dropped));
      }
    }
  });
  return acc.to(x.scalar_type());
}

void lora_grad_x_dropout_accum_cpu(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                   const DropoutMask& mask) {
  const int64_t M = grad_x.size(0), K = grad_x.size(1);
  const int64_t rows = std::min(M, rows_per_chunk(K, grad_x.element_size()));
  auto chunk = at::empty({rows, K}, grad_x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "lora_grad_x_dropout_cpu", [&] {
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t len = std::min(rows, M - m0);
      auto lora_grad = chunk.narrow(0, 0, len);
      at::mm_out(lora_grad, grad_shrink.narrow(0, m0, len), lora_A);
      accumulate_dropout(grad_x.data_ptr<scalar_t>() + m0 * K, lora_grad.data_ptr<scalar_t>(), len * K,
                         uint64_t(m0 * K), mask);
    }
  });
}

}  // namespace fastpeft
