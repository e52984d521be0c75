"""Sparse deltas on frozen weights: ``y = x (W + D)^T + b`` with D zero except at sorted flat
``indices`` (int32/int64, row-major into W's [out, in]) where it holds ``values``.

Ops: ``torch.ops.fastpeft.sparse_delta_linear`` (dense W) and ``sparse_delta_linear_4bit``
(bitsandbytes NF4/FP4 W, dequantized with the delta added before rounding), their backward ops,
and the building blocks ``sparse_delta_add_``, ``dequantize_4bit_add_delta_`` and
``sparse_delta_weight_grad``. This module registers the fake kernels (autograd is in C++) and
holds the plain-PyTorch references.

Saved for backward: x, indices and values (plus references to the frozen weight). Not saved:
W + D (backward rebuilds it in the workspace), any dense delta or dense weight gradient -- the
gradient of ``values`` is computed at the indices only, by a sampled product over the tokens.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastpeft.ops.quant4bit import dequantize_4bit_reference
from fastpeft.quant import Quant4bitWeight

Weight = Union[torch.Tensor, Quant4bitWeight]

# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::sparse_delta_add_")
def _(out, indices, values):
    return None


@torch.library.register_fake("fastpeft::dequantize_4bit_add_delta_")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, quant_type, indices,
      values, out):  # fmt: skip
    return None


@torch.library.register_fake("fastpeft::sparse_delta_weight_grad")
def _(grad_out, x, indices, chunk_tokens=0):
    return x.new_empty((indices.shape[0],), dtype=torch.float32)


@torch.library.register_fake("fastpeft::sparse_delta_linear")
def _(x, weight, bias, indices, values):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastpeft::sparse_delta_linear_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, out_features, blocksize, nested_blocksize,
      quant_type, bias, indices, values):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_backward(x, values, out_features, mask):
    grad_x = x.new_empty(x.shape) if mask[0] else x.new_empty((0,))
    grad_values = values.new_empty(values.shape) if mask[1] else values.new_empty((0,))
    grad_bias = x.new_empty((out_features,)) if mask[2] else x.new_empty((0,))
    return grad_x, grad_values, grad_bias


@torch.library.register_fake("fastpeft::sparse_delta_linear_backward")
def _(grad_out, x, weight, indices, values, output_mask):
    return _fake_backward(x, values, weight.shape[0], output_mask)


@torch.library.register_fake("fastpeft::sparse_delta_linear_4bit_backward")
def _(grad_out, x, packed, absmax, nested_absmax, nested_code, nested_offset, out_features, blocksize,
      nested_blocksize, quant_type, indices, values, output_mask):  # fmt: skip
    return _fake_backward(x, values, out_features, output_mask)


# ---- autograd ------------------------------------------------------------------------------------


# sparse_delta_linear and sparse_delta_linear_4bit have C++ autograd kernels
# (csrc/sparse_delta/sparse_delta_autograd.cpp): Python register_autograd would cost ~0.3 ms per layer and step.

# ---- public functions ----------------------------------------------------------------------------


def sparse_delta_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    indices: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``x (W + D)^T + b`` where ``D.flatten()[indices] = values`` and D is zero elsewhere.

    ``weight`` is a frozen dense [out, in] tensor in x's dtype or a
    ``fastpeft.quant.Quant4bitWeight``; ``indices`` are sorted unique flat indices into [out, in]
    (int32/int64) and ``values`` a float tensor of the same length (any float dtype; the delta is
    added in float32 and W + D rounded once to x's dtype). Gradients flow to x, the bias and
    ``values``; the values' gradient is computed only at the indices. The op trusts the indices
    to be sorted and unique (SparseDeltaLinear validates them once); any index outside the
    weight is ignored.
    """
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad:
            raise ValueError("sparse_delta_linear: weight must be frozen (requires_grad=False); train values instead")
        return torch.ops.fastpeft.sparse_delta_linear(x, weight, bias, indices, values)
    if not isinstance(weight, Quant4bitWeight):
        raise TypeError(f"weight must be a torch.Tensor or fastpeft.quant.Quant4bitWeight, got {type(weight).__name__}")
    if len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x has {x.shape[-1]} features")
    return torch.ops.fastpeft.sparse_delta_linear_4bit(
        x, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.nested_offset,
        weight.shape[0], weight.blocksize, weight.nested_blocksize, weight.quant_type, bias, indices, values,
    )  # fmt: skip


def merged_weight(weight: Weight, indices: torch.Tensor, values: torch.Tensor, dtype: Optional[torch.dtype] = None):
    """``W + D`` as a new dense tensor of ``dtype`` (default: the dense weight's dtype, or the dtype
    a 4-bit weight was quantized from), by the same kernels the forward uses."""
    if isinstance(weight, Quant4bitWeight):
        out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
        torch.ops.fastpeft.dequantize_4bit_add_delta_(
            weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.nested_offset,
            weight.blocksize, weight.nested_blocksize, weight.quant_type, indices, values, out,
        )  # fmt: skip
        return out
    out = weight.detach().to(dtype or weight.dtype, copy=True).contiguous()
    torch.ops.fastpeft.sparse_delta_add_(out, indices, values.detach())
    return out


# ---- references ----------------------------------------------------------------------------------


def dense_delta_reference(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense float32 D (tests and references only: it is what the ops never build)."""
    d = torch.zeros(shape, dtype=torch.float32, device=values.device)
    d.view(-1)[indices.long()] = values.float()
    return d


def _weight_f32(weight: Weight) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.float()
    return dequantize_4bit_reference(weight, torch.float32)  # code * scale, before any rounding


def merged_weight_reference(weight: Weight, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """W + D in plain PyTorch, rounded once to ``dtype`` after the float32 sum (differentiable
    in ``values``)."""
    w = _weight_f32(weight).reshape(-1)
    w = w.index_add(0, indices.long(), values.float())
    return w.view(tuple(weight.shape)).to(dtype)


def sparse_delta_linear_reference(
    x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch ``sparse_delta_linear``: a dense W + D, then F.linear (autograd gives a dense
    weight gradient, gathered at the indices for ``values``)."""
    return F.linear(x, merged_weight_reference(weight, indices, values, x.dtype), bias)
