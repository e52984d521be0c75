// CUDA kernels for the dropout-fused LoRA pieces.
//
// All three are GEMMs with one small dimension (the rank r) where one operand is x (or the input
// gradient) under the dropout mask. One tiled kernel serves them: C[i][j] = sum_k a(k, i) b(k, j)
// over 64 x 64 output tiles, 16-deep k steps staged in shared memory, 4 x 4 outputs per thread,
// fp32 accumulation. Loaders apply the mask while staging, so the dropped tensor and its mask are
// never written to memory; epilogues write the result (or accumulate it in place).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "lora/lora.h"

namespace fastpeft {
namespace {

constexpr int kTile = 64;     // output tile is kTile x kTile
constexpr int kDepth = 16;    // k elements staged per step
constexpr int kThreads = 256; // 16 x 16 threads, each 4 x 4 outputs

// Loaders return operand element (k, i) as float, 0 outside the matrix. kAlongI says whether
// consecutive i are adjacent in memory; the kernel then maps consecutive threads to consecutive
// i (else to consecutive k) so global loads coalesce.

// x[m][k] * mask(m, k): the row-major [M, K] input under dropout, indexed (k, m).
template <typename T>
struct DroppedRowsByK {
  static constexpr bool kAlongI = false;
  const T* x; int64_t M, K; DropoutMask mask;
  __device__ float operator()(int64_t k, int64_t m) const {
    if (m >= M || k >= K) return 0.0f;
    const int64_t idx = m * K + k;
    return static_cast<float>(x[idx]) * mask.factor(uint64_t(idx));
  }
};

// The same dropped x, indexed (m, k): reduction over rows, output along columns.
template <typename T>
struct DroppedColsByM {
  static constexpr bool kAlongI = true;
  const T* x; int64_t M, K; DropoutMask mask;
  __device__ float operator()(int64_t m, int64_t k) const {
    if (m >= M || k >= K) return 0.0f;
    const int64_t idx = m * K + k;
    return static_cast<float>(x[idx]) * mask.factor(uint64_t(idx));
  }
};

// A plain row-major [rows, cols] matrix read as element (k, i) = mat[i][k] (kAlongI = false) ...
template <typename T>
struct RowMajorTransposed {
  static constexpr bool kAlongI = false;
  const T* mat; int64_t rows, cols;
  __device__ float operator()(int64_t k, int64_t i) const {
    return (i < rows && k < cols) ? static_cast<float>(mat[i * cols + k]) : 0.0f;
  }
};

// ... or as element (k, i) = mat[k][i] (kAlongI = true).
template <typename T>
struct RowMajor {
  static constexpr bool kAlongI = true;
  const T* mat; int64_t rows, cols;
  __device__ float operator()(int64_t k, int64_t i) const {
    return (k < rows && i < cols) ? static_cast<float>(mat[k * cols + i]) : 0.0f;
  }
};

template <typename Loader>
__device__ __forceinline__ void stage(const Loader& load, float (*tile)[kTile + 4], int64_t k0, int64_t i0) {
#pragma unroll
  for (int t = 0; t < kTile * kDepth / kThreads; ++t) {
    const int lin = threadIdx.x + t * kThreads;
    const int kk = Loader::kAlongI ? lin / kTile : lin % kDepth;
    const int ii = Loader::kAlongI ? lin % kTile : lin / kDepth;
    tile[kk][ii] = load(k0 + kk, i0 + ii);
  }
}

// Grid: x over i tiles, y over j tiles, z over splits of the k range (k_per_split each).
template <typename LoadA, typename LoadB, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
small_gemm_kernel(LoadA load_a, LoadB load_b, Epilogue epilogue, int64_t I, int64_t J, int64_t Kdim,
                  int64_t k_per_split) {
  __shared__ float a_tile[kDepth][kTile + 4];
  __shared__ float b_tile[kDepth][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, j0 = int64_t(blockIdx.y) * kTile;
  const int64_t k_begin = int64_t(blockIdx.z) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < Kdim ? k_begin + k_per_split : Kdim;

  float acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDepth) {
    stage(load_a, a_tile, k0, i0);
    stage(load_b, b_tile, k0, j0);
    __syncthreads();
    // Rows past k_end (last step of a split) must not count: zero them by masking the sum.
    const int depth = k_end - k0 < kDepth ? int(k_end - k0) : kDepth;
    for (int kk = 0; kk < depth; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = a_tile[kk][ty * 4 + u];
#pragma unroll
      for (int v = 0; v < 4; ++v) b[v] = b_tile[kk][tx * 4 + v];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty * 4 + u, j = j0 + tx * 4 + v;
      if (i < I && j < J) epilogue(i, j, acc[u][v]);
    }
}

template <typename T>
struct StoreRowMajor {
  T* out; int64_t cols;
  __device__ void operator()(int64_t i, int64_t j, float v) const { out[i * cols + j] = static_cast<T>(v); }
};

struct StorePartial {  // fp32 partial sums of split z: out[z][i][j]
  float* out; int64_t rows, cols;
  __device__ void operator()(int64_t i, int64_t j, float v) const {
    out[(int64_t(blockIdx.z) * rows + i) * cols + j] = v;
  }
};

template <typename T>
struct AccumulateDropped {  // grad_x[m][k] += v * mask(m, k)
  T* grad_x; int64_t K; DropoutMask mask;
  __device__ void operator()(int64_t m, int64_t k, float v) const {
    const int64_t idx = m * K + k;
    grad_x[idx] = static_cast<T>(static_cast<float>(grad_x[idx]) + v * mask.factor(uint64_t(idx)));
  }
};

// Length of each split of a Kdim-long reduction cut into about `splits` parts, a multiple of kDepth
// and never 0 (an empty reduction would otherwise divide by it).
int64_t split_length(int64_t Kdim, int64_t splits) {
  return std::max<int64_t>(kDepth, ((Kdim + splits - 1) / splits + kDepth - 1) / kDepth * kDepth);
}

// Splits of a Kdim-long reduction: at least one, so an empty reduction still writes its zeros.
int64_t split_count(int64_t Kdim, int64_t k_per_split) {
  return std::max<int64_t>(1, (Kdim + k_per_split - 1) / k_per_split);
}

template <typename LoadA, typename LoadB, typename Epilogue>
void launch(LoadA a, LoadB b, Epilogue e, int64_t I, int64_t J, int64_t Kdim, int64_t k_per_split) {
  if (I == 0 || J == 0) return;  // nothing to write; a zero grid dimension is a launch error
  const dim3 grid((I + kTile - 1) / kTile, (J + kTile - 1) / kTile, split_count(Kdim, k_per_split));
  TORCH_CHECK(grid.y <= 65535, "fastpeft: LoRA kernel dimension too large (", J, ")");
  small_gemm_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, b, e, I, J, Kdim, k_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor lora_shrink_dropout_cuda(const at::Tensor& x, const at::Tensor& lora_A, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = lora_A.size(0);
  auto out = at::empty({M, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_dropout_cuda", [&] {
    // out[m][r] = sum_k dropped_x[m][k] * A[r][k]
    launch(DroppedRowsByK<scalar_t>{x.data_ptr<scalar_t>(), M, K, mask},
           RowMajorTransposed<scalar_t>{lora_A.data_ptr<scalar_t>(), R, K},
           StoreRowMajor<scalar_t>{out.data_ptr<scalar_t>(), R}, M, R, K, split_length(K, 1));
  });
  return out;
}

at::Tensor lora_grad_A_dropout_cuda(const at::Tensor& grad_shrink, const at::Tensor& x, const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = grad_shrink.size(1);
  // The r x K output has few tiles; split the long M reduction across blocks for parallelism and
  // sum the fp32 partials afterwards (deterministic, no atomics).
  const int64_t tiles = ((R + kTile - 1) / kTile) * ((K + kTile - 1) / kTile);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({(4 * sms + tiles - 1) / tiles, 64, (M + 255) / 256}));
  const int64_t k_per_split = split_length(M, splits);
  const int64_t used_splits = split_count(M, k_per_split);
  auto partial = at::empty({used_splits, R, K}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_grad_A_dropout_cuda", [&] {
    // grad_A[r][k] = sum_m grad_shrink[m][r] * dropped_x[m][k]
    launch(RowMajor<scalar_t>{grad_shrink.data_ptr<scalar_t>(), M, R},
           DroppedColsByM<scalar_t>{x.data_ptr<scalar_t>(), M, K, mask},
           StorePartial{partial.data_ptr<float>(), R, K}, R, K, M, k_per_split);
  });
  return partial.sum(0).to(x.scalar_type());
}

void lora_grad_x_dropout_accum_cuda(at::Tensor& grad_x, const at::Tensor& grad_shrink, const at::Tensor& lora_A,
                                    const DropoutMask& mask) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const int64_t M = grad_x.size(0), K = grad_x.size(1), R = lora_A.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "lora_grad_x_dropout_cuda", [&] {
    // grad_x[m][k] += mask(m, k) * sum_r grad_shrink[m][r] * A[r][k]
    launch(RowMajorTransposed<scalar_t>{grad_shrink.data_ptr<scalar_t>(), M, R},
           RowMajor<scalar_t>{lora_A.data_ptr<scalar_t>(), R, K},
           AccumulateDropped<scalar_t>{grad_x.data_ptr<scalar_t>(), K, mask}, M, K, R, split_length(R, 1));
  });
}

}  // namespace fastpeft
