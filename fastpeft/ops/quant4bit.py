"""Dequantization of bitsandbytes 4-bit weights: the op wrapper and its PyTorch reference."""

from __future__ import annotations

from typing import Optional

import torch

from fastpeft.quant import Quant4bitWeight

# bitsandbytes' code books (bitsandbytes.functional.get_4bit_type). FP4 entry 8 is -0.0, which is
# what bitsandbytes' CUDA and native CPU kernels produce there.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)) + tuple(
    -v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)


@torch.library.register_fake("fastpeft::dequantize_4bit_")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, quant_type, out):
    return None


def dequantize_4bit(
    weight: Quant4bitWeight, out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Dequantize a 4-bit weight, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

    One kernel launch, the double-quantized absmax included. ``out`` is a caller-provided buffer
    (any float dtype, contiguous, ``weight.numel`` elements, on the weight's device), so one
    workspace can serve every layer; without it a new tensor of ``dtype`` (default: the dtype the
    weight was quantized from) is returned in the weight's shape.
    """
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    elif out.numel() != weight.numel:
        raise ValueError(f"out has {out.numel()} elements but the weight {tuple(weight.shape)} has {weight.numel}")
    elif dtype is not None and out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} but dtype={dtype} was asked for")
    torch.ops.fastpeft.dequantize_4bit_(
        weight.packed,
        weight.absmax,
        weight.nested_absmax,
        weight.nested_code,
        weight.nested_offset,
        weight.blocksize,
        weight.nested_blocksize,
        weight.quant_type,
        out,
    )
    return out


def dequantize_4bit_reference(weight: Quant4bitWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-PyTorch dequantization with bitsandbytes' rounding: float32 ``code * scale``, one
    rounding to ``dtype``; the nested scale is rounded after the product and after the sum."""
    n = weight.numel
    device = weight.device
    code = torch.tensor(NF4_CODE if weight.quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)
    packed = weight.packed.long()
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:n]
    blocks = (n + weight.blocksize - 1) // weight.blocksize
    if weight.nested:
        nested = weight.nested_absmax.repeat_interleave(weight.nested_blocksize)[:blocks]
        scale = weight.nested_code[weight.absmax.long()] * nested
        scale = scale + weight.nested_offset
    else:
        scale = weight.absmax
    values = code[q] * scale.repeat_interleave(weight.blocksize)[:n]
    return values.to(dtype or weight.dtype).view(weight.shape)
