#include "common/workspace.h"

#include <ATen/ATen.h>

namespace fastpeft {
namespace {
thread_local at::Tensor cpu_buffer;  // uint8, grows to the largest request seen on this thread
}

at::Tensor dequant_workspace(int64_t numel, at::ScalarType dtype, at::Device device) {
  if (!device.is_cpu()) return at::empty({numel}, at::TensorOptions().dtype(dtype).device(device));
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (!cpu_buffer.defined() || cpu_buffer.numel() < bytes) {
    cpu_buffer = at::Tensor();  // free the old buffer before taking the bigger one
    cpu_buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  return cpu_buffer.narrow(0, 0, bytes).view(dtype);
}

void release_cpu_workspace() { cpu_buffer = at::Tensor(); }

}  // namespace fastpeft
