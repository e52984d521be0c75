"""Dequantization of bitsandbytes int8 row-wise weights (LLM.int8()): the op wrapper; the
reference is ``Int8Weight.dequantize_reference``."""

from __future__ import annotations

from typing import Optional

import torch

from fastpeft.quant import Int8Weight


@torch.library.register_fake("fastpeft::dequantize_int8_rowwise_")
def _(data, scale, out):
    return None


def dequantize_int8(weight: Int8Weight, out: Optional[torch.Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:  # fmt: skip
    """``(data * scale[:, None]) / 127`` in float32, rounded once to ``out``'s dtype (default
    ``dtype``, else float32); ``out`` is a contiguous caller buffer of the weight's shape."""
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype or torch.float32, device=weight.device)
    elif dtype is not None and out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} but dtype={dtype} was asked for")
    torch.ops.fastpeft.dequantize_int8_rowwise_(weight.data, weight.scale, out)
    return out
