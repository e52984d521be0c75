// Scratch memory for dequantized frozen weights, shared by every layer.
//
// CUDA: a plain at::empty. The caching allocator hands the block just freed by the previous
// layer back to the next one on the same stream, so all layers share one buffer and the stream
// order makes reuse safe without any bookkeeping here.
// CPU: one grow-only buffer per thread. Large CPU allocations are mmap'ed and page-faulted anew on
// every call, which costs more than the dequantization itself.
//
// Rule for callers: at most one workspace tensor is alive per thread at a time (take it, use it,
// drop it), because on CPU the next call returns the same memory.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastpeft {

at::Tensor dequant_workspace(int64_t numel, at::ScalarType dtype, at::Device device);

// Frees this thread's CPU buffer (exposed as fastpeft.quant.release_workspace()).
void release_cpu_workspace();

}  // namespace fastpeft
