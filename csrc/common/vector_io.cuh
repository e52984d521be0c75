// 16-byte vector loads and stores for CUDA kernels: VEC consecutive elements of T moved as one
// access, used where a launcher has checked that the extents divide by VEC and the bases are
// 16-byte aligned (is_aligned16).
#pragma once

#include <cstdint>

namespace fastpeft {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// A null pointer counts as aligned (an absent optional operand).
inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace fastpeft
