// CUDA dequantization of bitsandbytes 4-bit weights, bit-exact with bitsandbytes, one launch
// including the double-quantized absmax; optionally with a row or column factor folded in
// (DequantScale; (IA)^3), or followed by a launch that adds a sparse delta to listed elements before
// their rounding (sparse fine-tuning, see csrc/sparse_delta).
//
// Each thread turns 8 packed bytes into 16 outputs. Blocksizes are multiples of 16, so the 16
// outputs share one scale, computed once. Loads are 64-bit and stores 128-bit when aligned; the
// kernel is bound by the 2-4 bytes written per output, so that is what is vectorised.
#include <ATen/Dispatch.h>
#include <type_traits>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "quant4bit/quant4bit.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kOutPerThread = 16;

struct CodeBook {
  float v[16];
};

// The scale of block b; shared by the dequantization and the delta kernel so both round alike.
template <bool Nested>
__device__ __forceinline__ float block_scale(int64_t b, const float* __restrict__ absmax_f,
                                             const uint8_t* __restrict__ absmax_q,
                                             const float* __restrict__ nested_absmax, const float* s_nested_code,
                                             float offset, int64_t nested_blocksize) {
  if (Nested) {
    // bitsandbytes rounds the product, then the sum: no FMA here.
    return __fadd_rn(__fmul_rn(s_nested_code[absmax_q[b]], nested_absmax[b / nested_blocksize]), offset);
  }
  return absmax_f[b];
}

template <typename T, bool Nested, DequantScaleMode Mode>
__global__ void __launch_bounds__(kThreads)
dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f,
                       const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                       const float* __restrict__ nested_code, const float* __restrict__ nested_offset,
                       CodeBook book, int blocksize_log2, int64_t nested_blocksize, T* __restrict__ out,
                       int64_t numel, bool vector_io, const float* __restrict__ factors, int64_t cols) {
  // Codes are indexed by data, so they live in shared memory (constant memory would serialise).
  __shared__ float s_code[16];
  __shared__ float s_nested_code[Nested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = book.v[threadIdx.x];
  if (Nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested_code[i] = nested_code[i];
  }
  __syncthreads();
  const float offset = Nested ? *nested_offset : 0.0f;

  const int64_t groups = (numel + kOutPerThread - 1) / kOutPerThread;
  const int64_t nbytes = (numel + 1) / 2;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = g * kOutPerThread;
    const int64_t b = e0 >> blocksize_log2;
    const float scale =
        block_scale<Nested>(b, absmax_f, absmax_q, nested_absmax, s_nested_code, offset, nested_blocksize);

    uint8_t bytes[8];
    const bool full = e0 + kOutPerThread <= numel;
    if (full && vector_io) {
      *reinterpret_cast<uint2*>(bytes) = *reinterpret_cast<const uint2*>(packed + g * 8);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) bytes[i] = (g * 8 + i < nbytes) ? packed[g * 8 + i] : 0;
    }

    alignas(16) T vals[kOutPerThread];
    if (Mode == DequantScaleMode::None) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        vals[2 * i] = static_cast<T>(__fmul_rn(s_code[bytes[i] >> 4], scale));
        vals[2 * i + 1] = static_cast<T>(__fmul_rn(s_code[bytes[i] & 0xF], scale));
      }
    } else {
      // One division per thread, then the 16 outputs walk the row (cols may be < 16).
      int64_t row = e0 / cols, col = e0 - (e0 / cols) * cols;
#pragma unroll
      for (int i = 0; i < kOutPerThread; ++i) {
        const uint8_t q = (i & 1) ? (bytes[i >> 1] & 0xF) : (bytes[i >> 1] >> 4);
        // Past numel (the tail of the last group) row may run off the factors: not loaded, never stored.
        const int64_t idx = Mode == DequantScaleMode::Rows ? row : col;
        const float f = (e0 + i < numel) ? __ldg(factors + idx) : 0.0f;
        vals[i] = static_cast<T>(__fmul_rn(__fmul_rn(s_code[q], scale), f));
        if (++col == cols) {
          col = 0;
          ++row;
        }
      }
    }

    if (full && vector_io) {
      constexpr int kVecs = kOutPerThread * sizeof(T) / sizeof(uint4);
      uint4* dst = reinterpret_cast<uint4*>(out + e0);
      const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) dst[i] = src[i];
    } else {
      for (int i = 0; i < kOutPerThread && e0 + i < numel; ++i) out[e0 + i] = vals[i];
    }
  }
}

// One thread per delta entry: recompute the element's float32 value, add the delta, round once.
// Runs after dequantize_4bit_kernel on the same stream, so it overwrites that kernel's output.
template <typename T, bool Nested, typename Index>
__global__ void __launch_bounds__(kThreads)
add_delta_to_dequantized_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f,
                                const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                                const float* __restrict__ nested_code, const float* __restrict__ nested_offset,
                                CodeBook book, int blocksize_log2, int64_t nested_blocksize,
                                const Index* __restrict__ indices, const float* __restrict__ values, int64_t k,
                                T* __restrict__ out, int64_t numel) {
  __shared__ float s_code[16];
  __shared__ float s_nested_code[Nested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = book.v[threadIdx.x];
  if (Nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested_code[i] = nested_code[i];
  }
  __syncthreads();
  const float offset = Nested ? *nested_offset : 0.0f;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(indices[j]);
    if (e < 0 || e >= numel) continue;
    const float scale = block_scale<Nested>(e >> blocksize_log2, absmax_f, absmax_q, nested_absmax, s_nested_code,
                                            offset, nested_blocksize);
    const uint8_t byte = packed[e >> 1];
    const float q = s_code[(e & 1) ? (byte & 0xF) : (byte >> 4)];
    out[e] = static_cast<T>(__fadd_rn(__fmul_rn(q, scale), values[j]));
  }
}

int log2_exact(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

}  // namespace

void dequantize_4bit_cuda_kernel(const Quant4bitWeight& w, at::Tensor& out, const DequantScale& fold) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t numel = out.numel();
  const int64_t groups = (numel + kOutPerThread - 1) / kOutPerThread;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, int64_t(sms) * 32);
  CodeBook book;
  const float* code = quant4bit_code(w.type);
  for (int i = 0; i < 16; ++i) book.v[i] = code[i];
  const bool nested = w.nested();
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* factors = fold.mode == DequantScaleMode::None ? nullptr : fold.factors.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_cuda", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const uint8_t* packed = w.packed.data_ptr<uint8_t>();
    const bool vector_io = reinterpret_cast<uintptr_t>(out_ptr) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(packed) % 8 == 0;
    const uint8_t* absmax_q = nested ? w.absmax.data_ptr<uint8_t>() : nullptr;
    const float* absmax_f = nested ? nullptr : w.absmax.data_ptr<float>();
    const float* nested_absmax = nested ? w.nested_absmax.data_ptr<float>() : nullptr;
    const float* nested_code = nested ? w.nested_code.data_ptr<float>() : nullptr;
    const float* nested_offset = nested ? w.nested_offset.data_ptr<float>() : nullptr;
    const int bs_log2 = log2_exact(w.blocksize);
    auto launch = [&](auto nested_tag, auto mode_tag) {
      constexpr bool kNested = decltype(nested_tag)::value;
      constexpr DequantScaleMode kMode = decltype(mode_tag)::value;
      dequantize_4bit_kernel<scalar_t, kNested, kMode><<<blocks, kThreads, 0, stream>>>(
          packed, absmax_f, absmax_q, nested_absmax, nested_code, nested_offset, book, bs_log2,
          w.nested_blocksize, out_ptr, numel, vector_io, factors, fold.cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using NoScale = std::integral_constant<DequantScaleMode, DequantScaleMode::None>;
    using Rows = std::integral_constant<DequantScaleMode, DequantScaleMode::Rows>;
    using Cols = std::integral_constant<DequantScaleMode, DequantScaleMode::Cols>;
    auto with_mode = [&](auto nested_tag) {
      switch (fold.mode) {
        case DequantScaleMode::None: launch(nested_tag, NoScale{}); break;
        case DequantScaleMode::Rows: launch(nested_tag, Rows{}); break;
        case DequantScaleMode::Cols: launch(nested_tag, Cols{}); break;
      }
    };
    if (nested) {
      with_mode(std::true_type{});
    } else {
      with_mode(std::false_type{});
    }
  });
}


void dequantize_4bit_add_delta_cuda_kernel(const Quant4bitWeight& w, const Quant4bitDelta& delta, at::Tensor& out) {
  dequantize_4bit_cuda_kernel(w, out, DequantScale{});
  const int64_t k = delta.indices.numel();
  if (k == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((k + kThreads - 1) / kThreads, int64_t(sms) * 32);
  CodeBook book;
  const float* code = quant4bit_code(w.type);
  for (int i = 0; i < 16; ++i) book.v[i] = code[i];
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* values = delta.values.data_ptr<float>();
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const int bs_log2 = log2_exact(w.blocksize);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_add_delta_cuda", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(delta.indices.scalar_type(), "dequantize_4bit_add_delta_cuda_index", [&] {
      const index_t* idx = delta.indices.data_ptr<index_t>();
      if (w.nested()) {
        add_delta_to_dequantized_kernel<scalar_t, true, index_t><<<blocks, kThreads, 0, stream>>>(
            packed, nullptr, w.absmax.data_ptr<uint8_t>(), w.nested_absmax.data_ptr<float>(),
            w.nested_code.data_ptr<float>(), w.nested_offset.data_ptr<float>(), book, bs_log2, w.nested_blocksize,
            idx, values, k, out_ptr, out.numel());
      } else {
        add_delta_to_dequantized_kernel<scalar_t, false, index_t><<<blocks, kThreads, 0, stream>>>(
            packed, w.absmax.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, book, bs_log2,
            w.nested_blocksize, idx, values, k, out_ptr, out.numel());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastpeft
