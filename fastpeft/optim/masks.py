"""Sparse masks: which entries of which parameters are trained.

A mask is a ``dict`` from parameter name to either

* a 1-D tensor of sorted, unique flat indices into the parameter (row-major), int32 when the
  parameter has fewer than 2**31 elements and int64 otherwise, or
* ``None``: every entry of that parameter is trained (a BitFit bias, a dense classifier head).

Parameters not in the dict are frozen. A mask is never a dense 0/1 tensor: its size is 4 (or 8)
bytes per trained entry. Masks are saved as safetensors (``save_mask`` / ``load_mask``), which
holds plain tensors and never unpickles code.
"""

from __future__ import annotations

import json
import math
from typing import Dict, Iterable, Optional

import torch
from torch import nn

Mask = Dict[str, Optional[torch.Tensor]]

_INT32_LIMIT = 2**31 - 1
_FORMAT = "fastpeft.sparse_mask.v1"


def index_dtype(numel: int) -> torch.dtype:
    """int32 for tensors whose flat indices fit in 31 bits, else int64."""
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def keep_count(keep_ratio: float, numel: int) -> int:
    """How many entries a ratio keeps: ``round(keep_ratio * numel)``, at least 1, at most ``numel``."""
    check_keep_ratio(keep_ratio)
    return min(numel, max(1, round(keep_ratio * numel)))


def check_keep_ratio(keep_ratio: float, name: str = "keep_ratio") -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not math.isfinite(keep_ratio):
        raise ValueError(f"{name} must be a number in (0, 1], got {keep_ratio!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {keep_ratio}")


def validate_indices(indices: torch.Tensor, numel: int, name: str = "indices") -> torch.Tensor:
    """Check that ``indices`` is a mask of a tensor with ``numel`` elements; returns it flattened.

    Raises ValueError naming ``name`` for a non-integer dtype, more than one dimension, indices
    out of [0, numel), or indices that are not strictly increasing (unsorted or repeated).
    """
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of flat indices, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64 flat indices, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D (flat indices), got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return indices
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name} holds indices in [{lo}, {hi}] but the tensor has {numel} elements")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{name} must be sorted in increasing order without repeats (use torch.unique)")
    return indices


def validate_mask(model: nn.Module, mask: Mask) -> Mask:
    """Check every entry of ``mask`` against ``model``'s parameters; returns the mask."""
    params = dict(model.named_parameters())
    for name, idx in mask.items():
        if name not in params:
            raise ValueError(f"mask names parameter {name!r}, which the model does not have")
        if idx is not None:
            validate_indices(idx, params[name].numel(), f"mask[{name!r}]")
    return mask


def mask_density(model: nn.Module, mask: Mask) -> float:
    """Trained entries over all parameter entries of the model."""
    params = dict(model.named_parameters())
    trained = sum(params[n].numel() if idx is None else idx.numel() for n, idx in mask.items())
    return trained / max(1, sum(p.numel() for p in params.values()))


def dense_mask_of(indices: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The 0/1 float mask of a parameter, for tests and for the dense-masked baseline only."""
    if indices is None:
        return torch.ones_like(like)
    dense = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    dense[indices.long()] = 1
    return dense.view_as(like)


def matching_names(model: nn.Module, prefixes: Iterable[str]) -> list:
    """Parameter names equal to a prefix or inside a module named by it (``classifier`` matches
    ``classifier.weight`` and ``classifier.out_proj.bias``, not ``classifier_extra.weight``)."""
    prefixes = tuple(prefixes)
    return [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]


def save_mask(mask: Mask, path: str) -> None:
    """Write ``mask`` to a safetensors file (index tensors plus the names of dense entries)."""
    from safetensors.torch import save_file

    tensors = {name: idx.detach().cpu().contiguous() for name, idx in mask.items() if idx is not None}
    dense = sorted(name for name, idx in mask.items() if idx is None)
    save_file(tensors, path, metadata={"format": _FORMAT, "dense": json.dumps(dense)})


def load_mask(path: str, device=None) -> Mask:
    """Read a mask written by ``save_mask``; index tensors are checked for dtype, shape and order."""
    from safetensors import safe_open

    mask: Mask = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fastpeft sparse mask (format {meta.get('format')!r})")
        for name in json.loads(meta.get("dense", "[]")):
            mask[name] = None
        for name in f.keys():
            idx = f.get_tensor(name)
            numel_bound = int(idx.max()) + 1 if idx.numel() else 0
            validate_indices(idx, numel_bound, f"mask[{name!r}]")
            mask[name] = idx if device is None else idx.to(device)
    return mask
