"""DoRA (weight-decomposed LoRA, peft's ``use_dora=True``) pieces shared by ``LoRALinear`` and the
patched peft layers: the fused forward, the cached ``||W_row||^2`` of a frozen base, the magnitude
init and the merge math.

The forward is ``fastpeft.ops.dora_linear`` (see its module for the math and what it saves). The
row norm of ``W + scaling B A`` needs ``||W_row||^2``, a constant of the frozen base: it is computed
once per base weight, dtype and device and kept beside the layer (not in its state_dict), keyed on
the weight tensor and its version counter, so an in-place change of the base (a merge, a
``load_state_dict``) recomputes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpeft.nn.base import cast, frozen_weight, fused_lora_args, output_dtype
from fastpeft.nn.base import base_kind as _base_kind
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.frozen_weight import dense_weight_reference

_CACHE = "_fastpeft_weight_sq_norm"


def _weight_key(base_layer: nn.Module, dtype: torch.dtype):
    w = base_layer.weight
    return (id(w), w.data_ptr(), w._version, dtype, w.device)


@torch.no_grad()
def cached_weight_sq_norm(holder: nn.Module, base_layer: nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``||W_row||^2`` in float32 [out] of ``base_layer``'s weight in ``dtype`` (the compute dtype, so
    the norm sees the values the GEMM sees), cached in ``holder.__dict__``."""
    key = _weight_key(base_layer, dtype)
    cached = holder.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = dense_weight_reference(frozen_weight(base_layer, kind, dtype), dtype)
    value = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square_()
    holder.__dict__[_CACHE] = (key, value)
    return value


def fused_dora_forward(holder: nn.Module, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       magnitude: torch.Tensor, scaling: float, dropout_p: float, x: torch.Tensor,
                       kind: Optional[str] = None) -> torch.Tensor:  # fmt: skip
    """peft's DoRA forward of one projection through the fused op. ``holder`` keeps the cached
    ``||W_row||^2``. A quantized base returns x's dtype, as bitsandbytes does."""
    kind = kind or _base_kind(base_layer)
    dtype, weight, bias, A, B = fused_lora_args(base_layer, lora_A, lora_B, x, kind)
    sq_norm = cached_weight_sq_norm(holder, base_layer, kind, dtype)
    out = dora_linear(cast(x, dtype), weight, bias, A, B, magnitude, scaling, dropout_p, weight_sq_norm=sq_norm)
    return cast(out, output_dtype(x, dtype, kind))


@torch.no_grad()
def dora_weight_norm(base_layer: nn.Module, kind: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:  # fmt: skip
    """``||W + scaling B A||_2`` per row in float32, W dequantized (peft's magnitude init)."""
    w = dense_weight_reference(frozen_weight(base_layer, kind, torch.float32), torch.float32)
    return torch.linalg.vector_norm(w + scaling * (lora_B.float() @ lora_A.float()), dim=1)
