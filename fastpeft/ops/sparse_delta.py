"""Sparse deltas on frozen weights: ``y = x (W + D)^T + b`` with D zero except at sorted flat
``indices`` (int32/int64, row-major into W's [out, in]) where it holds ``values``.

Ops: ``torch.ops.fastpeft.sparse_delta_linear`` (W of any frozen-weight format: dense,
bitsandbytes NF4/FP4 or int8, dequantized with the delta added before the one rounding), its backward,
and the building blocks ``sparse_delta_add_``, ``dequantize_4bit_add_delta_`` and
``sparse_delta_weight_grad``. This module registers the fake kernels (autograd is in C++) and
holds the plain-PyTorch references.

Saved for backward: x, indices and values (plus references to the frozen weight). Not saved:
W + D (backward rebuilds it in the workspace), any dense delta or dense weight gradient -- the
gradient of ``values`` is computed at the indices only, by a sampled product over the tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft.ops.frozen_weight import dense_weight_reference_f32
from fastpeft.ops.int8 import dequantize_int8
from fastpeft.quant import FrozenWeight, Int8Weight, Quant4bitWeight, frozen_weight_args, frozen_weight_shapes

Weight = FrozenWeight

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
def _(x, weight_format, weight_tensors, weight_ints, bias, indices, values):
    ((out_features, _),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("fastpeft::sparse_delta_linear_backward")
def _(grad_out, x, weight_format, weight_tensors, weight_ints, indices, values, output_mask):
    ((out_features, _),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    grad_values = values.new_empty(values.shape) if output_mask[1] else values.new_empty((0,))
    grad_bias = x.new_empty((out_features,)) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_values, grad_bias


# ---- autograd ------------------------------------------------------------------------------------


# sparse_delta_linear has a C++ autograd kernel
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

    ``weight`` is a frozen dense [out, in] tensor in x's dtype, a ``fastpeft.quant.Quant4bitWeight``
    or a ``fastpeft.quant.Int8Weight``; ``indices`` are sorted unique flat indices into [out, in]
    (int32/int64) and ``values`` a float tensor of the same length (any float dtype; the delta is
    added in float32 and W + D rounded once to x's dtype). Gradients flow to x, the bias and
    ``values``; the values' gradient is computed only at the indices. The op trusts the indices
    to be sorted and unique (SparseDeltaLinear validates them once); any index outside the
    weight is ignored.
    """
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("sparse_delta_linear: weight must be frozen (requires_grad=False); train values instead")
    fmt, tensors, ints = frozen_weight_args([weight], x.shape[-1], name="weight")
    return torch.ops.fastpeft.sparse_delta_linear(x, fmt, tensors, ints, bias, indices, values)


def merged_weight(weight: Weight, indices: torch.Tensor, values: torch.Tensor, dtype: Optional[torch.dtype] = None):
    """``W + D`` as a new dense tensor of ``dtype`` (default: the dense weight's dtype, the dtype
    a 4-bit weight was quantized from, float32 for int8), by the same kernels the forward uses."""
    if isinstance(weight, Quant4bitWeight):
        out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
        torch.ops.fastpeft.dequantize_4bit_add_delta_(
            weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.nested_offset,
            weight.blocksize, weight.nested_blocksize, weight.quant_type, indices, values, out,
        )  # fmt: skip
        return out
    if isinstance(weight, Int8Weight):
        # the delta goes onto the float32 dequantization, then one rounding (as the forward does)
        out = dequantize_int8(weight, dtype=torch.float32)
        torch.ops.fastpeft.sparse_delta_add_(out, indices, values.detach())
        return out.to(dtype or torch.float32)
    out = weight.detach().to(dtype or weight.dtype, copy=True).contiguous()
    torch.ops.fastpeft.sparse_delta_add_(out, indices, values.detach())
    return out


# ---- references ----------------------------------------------------------------------------------


def dense_delta_reference(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense float32 D (tests and references only: it is what the ops never build)."""
    d = torch.zeros(shape, dtype=torch.float32, device=values.device)
    d.view(-1)[indices.long()] = values.float()
    return d


def merged_weight_reference(weight: Weight, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """W + D in plain PyTorch, rounded once to ``dtype`` after the float32 sum (differentiable
    in ``values``)."""
    w = dense_weight_reference_f32(weight).reshape(-1)
    w = w.index_add(0, indices.long(), values.float())
    return w.view(tuple(weight.shape)).to(dtype)


def sparse_delta_linear_reference(
    x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch ``sparse_delta_linear``: a dense W + D, then F.linear (autograd gives a dense
    weight gradient, gathered at the indices for ``values``)."""
    return F.linear(x, merged_weight_reference(weight, indices, values, x.dtype), bias)
