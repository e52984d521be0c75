// CUDA side of a multi-LoRA call shared by its kernel files (multi_lora_cuda.cu: segment kernels;
// multi_lora_rows_cuda.cu: grouped-layout gathers/scatters and BGMV): the adapter table read by the
// kernels and the plan's device pointers.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "multi_lora/multi_lora.h"

namespace fastpeft {

struct AdapterEntry {
  const void* A;        // [rank, K]
  const void* B;        // [O, rank]
  void* grad_A;         // [rank, K], null when not wanted
  void* grad_B;         // [O, rank], null when not wanted
  int64_t rank_offset;  // sum of the ranks of the adapters before this one
  int32_t rank;
  float scaling;
  DropoutMask dropout;
};
static_assert(sizeof(AdapterEntry) == 64, "AdapterEntry layout");

struct DevicePlan {
  const int32_t* sorted_rows;    // [M]
  const int32_t* segment_start;  // [N + 1]
  const int32_t* tile_start;     // [N + 1]
  const int32_t* group_start;    // [N + 1], the grouped layout's padded starts
  int32_t num_adapters;
};

inline DevicePlan device_plan(const RowPlan& plan) {
  const int32_t* offsets = plan.offsets.data_ptr<int32_t>();
  const int64_t n1 = plan.num_adapters + 1;
  return {plan.sorted_rows.data_ptr<int32_t>(), offsets, offsets + n1, offsets + 2 * n1,
          static_cast<int32_t>(plan.num_adapters)};
}

// The adapter table on the device. The pinned staging buffer is recycled by PyTorch's host
// allocator only after the copy (queued on the current stream) has run.
inline at::Tensor upload_table(const AdapterBank& bank, const std::vector<at::Tensor>* grad_A,
                               const std::vector<at::Tensor>* grad_B, at::Device device) {
  const int64_t n = static_cast<int64_t>(bank.size());
  const int64_t bytes = n * static_cast<int64_t>(sizeof(AdapterEntry));
  auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* entries = reinterpret_cast<AdapterEntry*>(host.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    AdapterEntry e;
    e.A = bank.A[i].data_ptr();
    e.B = bank.B[i].data_ptr();
    e.grad_A = (grad_A && (*grad_A)[i].defined()) ? (*grad_A)[i].data_ptr() : nullptr;
    e.grad_B = (grad_B && (*grad_B)[i].defined()) ? (*grad_B)[i].data_ptr() : nullptr;
    e.rank_offset = bank.rank_offsets[i];
    e.rank = static_cast<int32_t>(bank.ranks[i]);
    e.scaling = static_cast<float>(bank.scalings[i]);
    e.dropout = bank.dropout[i];
    entries[i] = e;
  }
  auto table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  table.copy_(host, /*non_blocking=*/true);
  return table;
}

inline const at::Tensor& table_of(const AdapterBank& bank, at::Device device) {
  if (!bank.device_table.defined()) bank.device_table = upload_table(bank, nullptr, nullptr, device);
  return bank.device_table;
}

inline const AdapterEntry* table_ptr(const at::Tensor& table) {
  return reinterpret_cast<const AdapterEntry*>(table.data_ptr());
}

// The largest a in [0, n) with start[a] <= p, given start[0] <= p and start nondecreasing: the
// segment (or group) holding position p; empty ones share their start with the next and lose.
__device__ __forceinline__ int segment_of(const int32_t* start, int n, int64_t p) {
  int lo = 0, hi = n;  // start[lo] <= p, and p < start[hi] or hi == n
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (start[mid] <= p) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace fastpeft
