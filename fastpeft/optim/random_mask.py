"""Random masks: the baseline FishMask is compared against (same number of trained entries,
chosen uniformly at random)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from fastpeft.optim.fisher import Eligible, eligible_parameters
from fastpeft.optim.masks import Mask, check_keep_ratio, index_dtype, keep_count


def sample_without_replacement(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct sorted int64 values from [0, n), uniformly, in O(k) memory when k << n."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct values from {n}")
    if 2 * k > n:
        # Dense case: a permutation costs O(n) but n < 2k here.
        return torch.randperm(n, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        # Draw with replacement, drop repeats, top up; a few rounds at most since k <= n / 2.
        extra = torch.randint(0, n, (int((k - chosen.numel()) * 1.25) + 16,), generator=generator)
        merged = torch.unique(torch.cat([chosen, extra]))
        if merged.numel() > k:
            # Keep a uniformly random subset of the surplus-bearing set, not its smallest values.
            merged = merged[torch.randperm(merged.numel(), generator=generator)[:k]].sort().values
        chosen = merged
    return chosen


def _split_by_tensor(flat: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    offsets = torch.tensor([0] + sizes).cumsum(0)
    out = []
    for i, size in enumerate(sizes):
        lo, hi = torch.searchsorted(flat, offsets[i : i + 2]).tolist()
        out.append(flat[lo:hi] - offsets[i])
    return out


def random_mask(
    model: nn.Module,
    keep_ratio: Optional[float] = None,
    like: Optional[Mask] = None,
    scope: str = "global",
    seed: int = 0,
    include: Optional[Eligible] = None,
    dense_modules: Sequence[str] = (),
) -> Mask:
    """A uniformly random mask.

    Either ``keep_ratio`` (the fraction of eligible entries, over all of them for
    ``scope="global"`` or per tensor for ``"per_layer"``, counted as in fisher_mask), or
    ``like=`` another mask, whose parameters get the same number of random entries each (its
    ``None`` entries stay ``None``): the random baseline of the same density as a FishMask.
    ``seed`` makes it reproducible; ``include`` / ``dense_modules`` as in fisher_mask.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    mask: Mask = {}
    if like is not None:
        if keep_ratio is not None:
            raise ValueError("pass either keep_ratio or like, not both")
        for name, idx in like.items():
            if name not in params:
                raise ValueError(f"like names parameter {name!r}, which the model does not have")
            if idx is None:
                mask[name] = None
                continue
            n = params[name].numel()
            mask[name] = sample_without_replacement(n, idx.numel(), gen).to(index_dtype(n))
        return mask
    if keep_ratio is None:
        raise ValueError("random_mask needs keep_ratio or like")
    check_keep_ratio(keep_ratio)
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    names, dense = eligible_parameters(model, include, dense_modules)
    if not names:
        raise ValueError("no parameter is eligible for the mask; check include= and dense_modules=")
    sizes = [params[n].numel() for n in names]
    if scope == "global":
        flat = sample_without_replacement(sum(sizes), keep_count(keep_ratio, sum(sizes)), gen)
        for n, size, idx in zip(names, sizes, _split_by_tensor(flat, sizes)):
            if idx.numel():
                mask[n] = idx.to(index_dtype(size))
    else:
        for n, size in zip(names, sizes):
            mask[n] = sample_without_replacement(size, keep_count(keep_ratio, size), gen).to(index_dtype(size))
    for n in dense:
        mask[n] = None
    return mask
