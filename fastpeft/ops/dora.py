"""Fused DoRA linear (weight-decomposed LoRA, peft's ``use_dora=True``) on one projection.

With ``n = ||W + scaling * B A||_2`` per output row (detached, as in peft) and ``x_d = dropout(x)``::

    out = x W^T + b + (m / n - 1) * (x_d W^T) + (m / n) * scaling * (x_d A^T) B^T

which without dropout is ``(m / n) * (x W^T + scaling * (x A^T) B^T) + b``. One op,
``torch.ops.fastpeft.dora_linear``, for any frozen-weight format (dense, bitsandbytes NF4/FP4,
bitsandbytes int8). How it differs from peft's layer (csrc/dora/dora.cpp has the details):

- the norm comes from ``||W_row||^2`` (a constant of the frozen weight, cached by the layer) and
  ``A W^T``, which the base GEMM produces with A stacked under x: the weight is dequantized once
  and read by one GEMM; peft builds ``B A`` and ``W + scaling B A`` ([out, in] each) every step;
- without dropout the base product is reused for the DoRA scaling (peft #2107); with dropout it
  needs ``x_d W^T`` as well (two base GEMMs, as in peft), x_d made from the seed and never saved;
- saved for backward: x, y = ``x_d W^T + scaling (x_d A^T) B^T`` [M, out], the [M, r] shrink and
  the norm; nothing of size out x in.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft.ops.dropout import dropout_reference, new_seed
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import FrozenWeight, frozen_weight_args, frozen_weight_shapes


@torch.library.register_fake("fastpeft::dora_linear")
def _(x, weight_format, weight_tensors, weight_ints, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed,
      weight_sq_norm):  # fmt: skip
    ((out_features, _),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    return (x.new_empty((*lead, out_features)), x.new_empty((m, out_features)), x.new_empty((m, lora_A.shape[0])),
            x.new_empty((out_features,), dtype=torch.float32))  # fmt: skip


@torch.library.register_fake("fastpeft::dora_linear_backward")
def _(grad_out, x, y, shrink, weight_norm, weight_format, weight_tensors, weight_ints, lora_A, lora_B, magnitude,
      scaling, dropout_p, seed, output_mask):  # fmt: skip
    def maybe(flag, like, shape=None):
        return like.new_empty(like.shape if shape is None else shape) if flag else x.new_empty((0,))

    return (maybe(output_mask[0], x), maybe(output_mask[1], lora_A), maybe(output_mask[1], lora_B),
            maybe(output_mask[1], magnitude), maybe(output_mask[2], x, (lora_B.shape[0],)))  # fmt: skip


def dora_linear(
    x: torch.Tensor,
    weight: FrozenWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    weight_sq_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """peft's DoRA forward for one projection, fused; gradients flow to x, lora_A, lora_B, magnitude
    and the bias (the base weight is frozen: a dense weight that requires grad is refused).

    ``weight`` is a dense [out, in] tensor, a ``fastpeft.quant.Quant4bitWeight`` or a
    ``fastpeft.quant.Int8Weight``; ``lora_A`` [r, in] and ``lora_B`` [out, r] in x's dtype;
    ``magnitude`` [out] (any float dtype; peft keeps it in float32). ``dropout_p`` drops x in the
    adapter branch (peft's dropout on the DoRA path) with the counter mask of ``seed`` (fresh by
    default). ``weight_sq_norm``: ``||W_row||^2`` in float32 [out] if the caller caches it (the
    ``LoRALinear`` layer does); None computes it from W. Returns [..., out] in x's dtype.
    """
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seed = (new_seed() if seed is None else seed) if dropout_p > 0 else None
    fmt, tensors, ints = frozen_weight_args([weight], x.shape[-1])
    out, _, _, _ = torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, bias, lora_A, lora_B, magnitude,
                                                  float(scaling), dropout_p, seed, weight_sq_norm)  # fmt: skip
    return out


def dora_weight_norm_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                               scaling: float) -> torch.Tensor:  # fmt: skip
    """peft's ``DoraLinearLayer.get_weight_norm``: ``||W + scaling * B A||_2`` over each row of a dense W."""
    return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1).to(weight.dtype)


def dora_linear_reference(
    x: torch.Tensor,
    weight: FrozenWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-PyTorch DoRA, term for term peft's ``DoraLinearVariant.forward`` (same dropout mask
    as the fused op)."""
    w = dense_weight_reference(weight, x.dtype)
    result = F.linear(x, w, bias)
    norm = dora_weight_norm_reference(w, lora_A, lora_B, scaling).detach()
    scale = (magnitude / norm).view(1, -1)
    if dropout_p > 0:
        x = dropout_reference(x, dropout_p, seed)
        base = F.linear(x, w)
    else:
        base = result if bias is None else result - bias
    lora = F.linear(F.linear(x, lora_A), lora_B)
    return (result + (scale - 1) * base + scale * lora * scaling).to(x.dtype)
