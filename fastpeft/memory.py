"""Exact memory accounting for one training step: what autograd saves for backward, and the peak of
live tensor bytes.

``measure_step(step)`` runs ``step`` (a callable that does forward and backward, optionally the
optimizer step) once and returns a ``StepMemory``:

* ``saved_bytes``: the bytes of every storage autograd saved for backward during the step, each
  storage counted once however many tensors (views) of it were saved, counted through
  ``torch.autograd.graph.saved_tensors_hooks``. Storages of ``exclude`` (tensors, or modules whose
  parameters and buffers are meant: the frozen weights, the adapters) are skipped, so the figure is
  the activations a step keeps alive between forward and backward.
* ``peak_bytes``: the highest live tensor bytes during the step above what was live when it
  started. On CUDA ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the start
  (the caching allocator's view: every tensor allocation, rounded up to its 512-byte blocks). On
  the CPU the profiler's memory timeline (``torch.profiler.profile(profile_memory=True)``): every
  allocation and free through PyTorch's CPU allocator, inside C++ ops too, replayed in time order;
  the figure is exact to the byte. Memory that a library allocates outside PyTorch's allocator
  (a oneDNN scratch pad, a BLAS workspace) is not seen.

What ``saved_bytes`` does not see: tensors that a step keeps alive by other means than autograd's
saved tensors. Non-reentrant gradient checkpointing (``torch.utils.checkpoint(use_reentrant=False)``)
installs its own saved-tensor hooks inside each checkpointed region, so what it recomputes is not
saved and not counted (the region's inputs are, through checkpoint's own saved inputs); that is the
point of checkpointing. Custom autograd Functions that stash tensors on ``ctx`` attributes instead of
``ctx.save_for_backward`` are invisible too. ``peak_bytes`` sees everything the allocator does.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["StepMemory", "measure_step", "saved_bytes", "peak_bytes", "storages_of"]


@dataclasses.dataclass
class StepMemory:
    """What ``measure_step`` measured for one step.

    ``saved_bytes``: bytes of the distinct storages saved for backward (``exclude`` skipped);
    ``saved_storages``: how many distinct storages those are; ``peak_bytes``: peak live tensor bytes
    above the start of the step (None when it was not measured); ``device``: where the peak was
    measured ("cpu" or "cuda"); ``result``: what ``step`` returned."""

    saved_bytes: int
    saved_storages: int
    peak_bytes: Optional[int]
    device: str
    result: Any = None


def storages_of(exclude: Iterable[Union[torch.Tensor, nn.Module]]) -> set:
    """The storage addresses (``untyped_storage().data_ptr()``) of the given tensors, and of every
    parameter and buffer of the given modules. A bitsandbytes 4-bit weight brings its quantization
    statistics (absmax, code, and the nested ones of double quantization) along."""
    ptrs = set()

    def add(t):
        if isinstance(t, torch.Tensor):
            ptrs.add(t.untyped_storage().data_ptr())
            state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
            while state is not None:
                for name in ("absmax", "code", "offset"):
                    add(getattr(state, name, None))
                state = getattr(state, "state2", None)

    for item in exclude:
        if isinstance(item, nn.Module):
            for p in item.parameters():
                add(p)
            for b in item.buffers():
                add(b)
        elif isinstance(item, torch.Tensor):
            add(item)
        else:
            raise TypeError(f"exclude takes tensors and nn.Modules, got {type(item).__name__}")
    return ptrs


class _SavedCounter:
    """A pack hook that counts each saved storage once. It keeps no saved tensor alive (that would
    raise the step's peak): each storage is remembered by a weak reference to its Python object, which
    PyTorch keeps unique per storage, so an address reused by a later allocation counts again."""

    def __init__(self, skip: set):
        self.skip = skip
        self.live = {}  # data_ptr -> weakref to the UntypedStorage object
        self.bytes = 0
        self.count = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or storage.nbytes() == 0:
            return t
        ref = self.live.get(ptr)
        if ref is None or ref() is not storage:
            self.live[ptr] = weakref.ref(storage)
            self.bytes += storage.nbytes()
            self.count += 1
        return t


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"measure_step measures peaks on 'cpu' or 'cuda', got device {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("measure_step(device='cuda') needs a visible CUDA device")
    return kind


def _cpu_peak(timeline) -> int:
    """Peak of (bytes created - bytes destroyed) over the profiler's memory timeline."""
    from torch.profiler._memory_profiler import Action

    live = peak = 0
    for _, action, _, nbytes in sorted(timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            live += nbytes
            peak = max(peak, live)
        elif action == Action.DESTROY:
            live -= nbytes
    return peak


def measure_step(step: Callable[[], Any], device=None, exclude: Iterable = (), peak: bool = True) -> StepMemory:
    """Run ``step()`` once and measure its saved-for-backward bytes and its peak of live tensor bytes.

    ``step``: a callable that runs one training step (forward and backward; an optimizer step too if
    that belongs to what is measured). ``device``: where the step runs, "cpu" (default) or "cuda"; it
    chooses how the peak is measured (see the module docstring). ``exclude``: tensors or modules whose
    storages (parameters and buffers, for a module) are not counted as saved: pass the model to count
    activations only. ``peak=False`` skips the peak (on the CPU the profiler makes a step several
    times slower). Runs on the CPU peak under ``torch.profiler``, so it cannot be nested in another
    profiler."""
    if not callable(step):
        raise TypeError(f"measure_step takes a callable that runs one step, got {type(step).__name__}")
    kind = _device_type(device)
    counter = _SavedCounter(storages_of(exclude))
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
    if not peak:
        with hooks:
            result = step()
        return StepMemory(counter.bytes, counter.count, None, kind, result)
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with hooks:
            result = step()
        torch.cuda.synchronize()
        return StepMemory(counter.bytes, counter.count, torch.cuda.max_memory_allocated() - start, kind, result)
    from torch.profiler import ProfilerActivity, profile

    # record_shapes and with_stack are what the memory profiler needs to attribute allocations.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True,
                 acc_events=True) as prof:  # fmt: skip
        with hooks:
            result = step()
    return StepMemory(counter.bytes, counter.count, _cpu_peak(prof._memory_profile().timeline), kind, result)


def saved_bytes(step: Callable[[], Any], exclude: Iterable = ()) -> int:
    """Bytes autograd saves for backward while ``step()`` runs, each storage once, ``exclude``'s
    storages skipped (``measure_step`` without the peak)."""
    return measure_step(step, exclude=exclude, peak=False).saved_bytes


def peak_bytes(step: Callable[[], Any], device=None) -> int:
    """Peak live tensor bytes above the start while ``step()`` runs on ``device`` ("cpu" or "cuda")."""
    return measure_step(step, device=device).peak_bytes
