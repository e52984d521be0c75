"""Frozen base weights in the references: any format as a plain dense tensor."""

from __future__ import annotations

import torch

from fastpeft.ops.quant4bit import dequantize_4bit_reference
from fastpeft.quant import FrozenWeight, Int8Weight, Quant4bitWeight


def dense_weight_reference(weight: FrozenWeight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense [out, in] tensor of ``dtype`` in plain PyTorch: a dense weight as it is, a 4-bit
    or int8 weight dequantized by its reference (float32 math, one rounding to ``dtype``)."""
    if isinstance(weight, Quant4bitWeight):
        return dequantize_4bit_reference(weight, dtype)
    if isinstance(weight, Int8Weight):
        return weight.dequantize_reference(dtype)
    return weight


def dense_weight_reference_f32(weight: FrozenWeight) -> torch.Tensor:
    """W in float32 before any rounding to a compute dtype (the sparse-delta references add to it)."""
    if isinstance(weight, torch.Tensor):
        return weight.float()
    return dense_weight_reference(weight, torch.float32)
