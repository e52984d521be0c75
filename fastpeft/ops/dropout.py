"""The counter-based dropout mask shared by fastpeft's kernels, in plain PyTorch.

Element ``i`` (row-major index) of a dropout mask is kept when a hash of ``(seed, i)`` clears a
threshold: the same bits come out of the C++ and CUDA kernels (csrc/common/dropout_mask.h), so a
backward pass regenerates the forward mask instead of storing it, and tests compare exactly.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 with int64 tensors without overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of csrc/common/dropout_mask.h on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(v: int) -> int:
    return int(mix32(torch.tensor([v & _M32], dtype=torch.int64))[0])


def new_seed() -> torch.Tensor:
    """A fresh dropout seed: an int64 tensor of one element, drawn from torch's CPU generator
    (so ``torch.manual_seed`` makes runs repeatable)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def dropout_factor_reference(numel: int, p: float, seed, device=None) -> torch.Tensor:
    """float32 multipliers for elements ``0 .. numel-1``: 0 where dropped, ``1/(1-p)`` where kept."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    s = int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed)
    s &= (1 << 64) - 1
    key_lo = _mix32_int((s & _M32) + 0x9E3779B9)
    seed_hi = s >> 32
    threshold = round(p * 16777216.0)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)

    idx = torch.arange(numel, dtype=torch.int64, device=device)
    lo = idx & _M32
    hi = idx >> 32
    key_hi = mix32(seed_hi ^ mix32((hi + key_lo) & _M32))
    h = mix32(mix32(lo ^ key_lo) ^ key_hi)
    keep = (h >> 8) >= threshold
    return torch.where(keep, scale.to(device), torch.zeros((), dtype=torch.float32, device=device))


def dropout_reference(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """``x`` under the mask, as the kernels compute it: ``x * factor`` in float32, rounded once to
    x's dtype. Indices are row-major over ``x.reshape(-1, x.shape[-1])``."""
    factor = dropout_factor_reference(x.numel(), p, seed, x.device).view(x.shape)
    return (x.float() * factor).to(x.dtype)


# ---- fake kernels of the materialised-dropout ops (csrc/dropout) -----------------------------------


@torch.library.register_fake("fastpeft::dropout_apply")
def _(x, dropout_p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastpeft::dropout_apply_add_")
def _(out, x, dropout_p, seed):
    return None
