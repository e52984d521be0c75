"""Exact top-k over many large score tensors without sorting them.

FishMask keeps the k entries with the largest Fisher score over a whole model (billions of
scores). Sorting them all, or concatenating them, would need several times the model's memory.
Instead the k-th largest value is found by a radix select on the float32 bit patterns (scores
are >= 0, so their bits order like the values): four passes of a 256-bin histogram, each over
one tensor chunk at a time. Then each tensor keeps its entries above that value, and the ties at
that value are taken in (tensor order, flat index) order until k entries are kept -- the same
result as a stable descending sort of all scores concatenated.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from fastpeft.optim.masks import index_dtype

# Elements per histogram call: bounds the temporary memory to a few times this, whatever the
# tensor size.
_CHUNK = 1 << 24


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


def _bits(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.contiguous().view(torch.int32)


def kth_largest_bits(scores: Sequence[torch.Tensor], k: int):
    """(bit pattern of the k-th largest score, how many entries equal to it belong to the top k)."""
    prefix, prefix_mask, remaining = 0, 0, k
    for shift in (24, 16, 8, 0):
        hist = None
        for t in scores:
            for chunk in _chunks(t):
                bits = _bits(chunk)
                if prefix_mask:
                    bits = bits[(bits & prefix_mask) == prefix]
                h = torch.bincount(((bits >> shift) & 0xFF).long(), minlength=256).cpu()
                hist = h if hist is None else hist + h
        # Walk bins from the largest: the k-th largest lies in the first bin where the count of
        # entries at or above it reaches `remaining`.
        above = 0
        for b in range(255, -1, -1):
            c = int(hist[b])
            if above + c >= remaining:
                prefix |= b << shift
                prefix_mask |= 0xFF << shift
                remaining -= above
                break
            above += c
    return prefix, remaining


def topk_indices(scores: Sequence[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Sorted flat indices, per tensor, of the ``k`` largest entries over all ``scores``.

    ``scores`` are float32 tensors of finite values >= 0 (any shapes, any devices). Ties at the
    k-th value go to the lowest (tensor position, flat index), so the result equals taking the
    first k of a stable descending sort of all scores concatenated. Index dtype: int32 when the
    tensor has fewer than 2**31 elements, else int64.
    """
    scores = list(scores)
    total = sum(s.numel() for s in scores)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of scores), got {k}")
    for i, s in enumerate(scores):
        if s.dtype != torch.float32:
            raise ValueError(f"scores[{i}] must be float32, got {s.dtype}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"scores[{i}] must be finite and >= 0 (squared gradients); check the loss for inf/nan")
    # -0.0 has the sign bit set and would sort above every positive score by its bits.
    scores = [s.abs() if bool(torch.signbit(s).any()) else s for s in scores]
    threshold, ties_left = kth_largest_bits(scores, k)
    threshold_value = torch.tensor([threshold], dtype=torch.int32).view(torch.float32).item()
    out = []
    for s in scores:
        flat = s.reshape(-1)
        above = torch.nonzero(flat > threshold_value).flatten()
        ties = torch.nonzero(flat == threshold_value).flatten()
        take = min(ties_left, ties.numel())
        ties_left -= take
        idx = torch.cat([above, ties[:take]]).sort().values if take else above
        out.append(idx.to(index_dtype(flat.numel())))
    return out
