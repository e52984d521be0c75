// Fused linear cross-entropy: the loss of cross_entropy(h W^T, labels) computed chunk by chunk of
// tokens, so no [tokens, vocab] logits or logits gradient is ever held (Liger / Cut Cross-Entropy
// style). The GEMMs run in ATen; this family's kernel is the row-wise part between them.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastpeft {

// The row-wise part of one chunk, in place: for each row i of logits [C, V] (any float dtype,
// contiguous; math in float32), with z = softcap * tanh(x / softcap) when softcap > 0 (else z = x):
//   loss[i]  = logsumexp(z_i) - z_i[labels[i]]                          (0 when labels[i] == ignore_index)
//   logits_i <- grad_scale * (softmax(z_i) - onehot(labels[i])) * dz/dx   (0 when ignored)
// labels: int64 [C] in [0, V) or ignore_index (the op body checks the range on the host for CPU
// labels; the CUDA kernel asserts on the device). loss: float32 [C].
struct CrossEntropyRows {
  double softcap = 0.0;
  int64_t ignore_index = -100;
  double grad_scale = 1.0;
};

void cross_entropy_rows_cpu(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, const CrossEntropyRows& p);
#ifdef FASTPEFT_WITH_CUDA
void cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, const CrossEntropyRows& p);
#endif

}  // namespace fastpeft
