"""(IA)^3: learned rescaling of activations (Liu et al. 2022, T-Few), with mixed-task batches.

Ops (``torch.ops.fastpeft.*``):

* ``ia3_scale(x, vectors, task_ids)``: ``x * vectors[task_ids[b]]`` for every row of example ``b``;
  ``vectors`` is a bank ``[T, d]`` and ``task_ids`` ``[B]`` (``None``: one task, ``T == 1``).
  One launch for any number of tasks; backward reduces the vector gradients per task in one pass
  over the activations, with no atomics. Saves ``x`` for backward.
* ``ia3_linear``: a frozen linear layer (dense, bitsandbytes 4-bit or int8; the weight argument is
  built by ``fastpeft.quant.frozen_weight_args``) with
  (IA)^3 on its output (``y = (x W^T + b) * l``, keys and values) or on its input
  (``y = (x * l) W^T + b``, ``is_feedforward``, the FFN intermediate). For one task on a 4-bit
  base the vector is folded into the dequantization, so scaling costs no pass over activations;
  otherwise the GEMM output is scaled in place (output side) or x is scaled into the GEMM input.
  Saves for backward: the output ``y`` on the output side (the vector gradient is
  ``sum(grad * y) / l``; an entry of ``l`` that is exactly 0 gets gradient 0), ``x`` on the
  feed-forward side. Never the dequantized weight or a second ``[M, out]`` tensor.

This module registers the fake kernels and autograd, and holds the plain-PyTorch references.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import FrozenWeight, Quant4bitWeight, frozen_weight_args, frozen_weight_shapes

Weight = FrozenWeight

# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::ia3_scale")
def _(x, vectors, task_ids):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastpeft::ia3_scale_")
def _(x, vectors, task_ids):
    return None


@torch.library.register_fake("fastpeft::ia3_scale_backward")
def _(grad, saved, vectors, task_ids, divide_by_vectors, output_mask):
    grad_x = saved.new_empty(saved.shape) if output_mask[0] else saved.new_empty((0,))
    grad_v = vectors.new_empty(vectors.shape) if output_mask[1] else vectors.new_empty((0,))
    return grad_x, grad_v


@torch.library.register_fake("fastpeft::ia3_linear")
def _(x, weight_format, weight_tensors, weight_ints, bias, vectors, task_ids, is_feedforward):
    ((out_features, _),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("fastpeft::ia3_linear_backward")
def _(grad_out, saved, weight_format, weight_tensors, weight_ints, vectors, task_ids, is_feedforward, output_mask):
    ((_, in_features),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    grad_x = saved.new_empty((*saved.shape[:-1], in_features)) if output_mask[0] else saved.new_empty((0,))
    grad_v = vectors.new_empty(vectors.shape) if output_mask[1] else vectors.new_empty((0,))
    return grad_x, grad_v


@torch.library.register_fake("fastpeft::dequantize_4bit_scaled_")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, quant_type, scale,
      scale_dim, out):  # fmt: skip
    return None


# ---- autograd ------------------------------------------------------------------------------------
# ia3_scale and ia3_linear have C++ autograd kernels (csrc/ia3/ia3_autograd.cpp):
# Python register_autograd would cost ~0.3 ms per layer and step.

# ---- public functions ----------------------------------------------------------------------------


def _check_frozen(weight, bias):
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                f"ia3_linear treats the base {name} as frozen and gives it no gradient; call "
                f".requires_grad_(False) on it (or detach it) first"
            )


def ia3_scale(x: torch.Tensor, vectors: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * vectors[task_ids[b]]`` for every row of example ``b`` of ``x`` [B, ..., d].

    ``vectors`` is a bank [T, d] (float32 or x's dtype; the product is taken in float32 and rounded
    once); ``task_ids`` [B] int64/int32 on x's device or the CPU (CPU ids are range-checked on the
    host; GPU ids by a device-side assert). Without ``task_ids``, ``vectors`` is [1, d] or [d].
    Differentiable in x and vectors; saves x for backward.
    """
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    return torch.ops.fastpeft.ia3_scale(x, vectors, task_ids)


def ia3_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    vectors: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    is_feedforward: bool = False,
) -> torch.Tensor:
    """Frozen linear with (IA)^3: ``(x W^T + b) * l`` or, with ``is_feedforward``, ``(x * l) W^T + b``.

    ``weight`` is a dense [out, in] tensor (x's dtype), a ``fastpeft.quant.Quant4bitWeight`` or a
    ``fastpeft.quant.Int8Weight``;
    ``vectors`` a bank [T, out] (output side) or [T, in] (feed-forward), float32 or x's dtype;
    ``task_ids`` [B] picks each example's vector (``None``: T == 1). The base weight and bias are
    frozen (no gradient). Saves y (output side) or x (feed-forward) for backward.
    """
    _check_frozen(weight, bias)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    fmt, tensors, ints = frozen_weight_args([weight], x.shape[-1], name="weight")
    return torch.ops.fastpeft.ia3_linear(x, fmt, tensors, ints, bias, vectors, task_ids, bool(is_feedforward))


def dequantize_4bit_scaled(weight: Quant4bitWeight, scale: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """The 4-bit weight with ``scale`` folded in: ``diag(scale) W`` (dim 0) or ``W diag(scale)`` (dim 1).

    Bit-exact with ``(dequantize_4bit_reference(weight, float32) * scale).to(dtype)``: one pass.
    """
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    torch.ops.fastpeft.dequantize_4bit_scaled_(
        weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.nested_offset,
        weight.blocksize, weight.nested_blocksize, weight.quant_type, scale, dim, out,
    )  # fmt: skip
    return out


# ---- references ----------------------------------------------------------------------------------


def _row_vectors(x_like: torch.Tensor, vectors: torch.Tensor, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The vector of every example, shaped to broadcast against ``x_like`` [B, ..., d]."""
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if task_ids is None:
        return vectors[0]
    per_example = vectors[task_ids.to(vectors.device).long()]  # [B, d]
    return per_example.view(per_example.shape[0], *([1] * (x_like.dim() - 2)), per_example.shape[1])


def ia3_scale_reference(x: torch.Tensor, vectors: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-PyTorch ``ia3_scale``: float32 product, one rounding to x's dtype (as peft does)."""
    return (x.float() * _row_vectors(x, vectors, task_ids).float()).to(x.dtype)


def ia3_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    vectors: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    is_feedforward: bool = False,
) -> torch.Tensor:
    """Plain-PyTorch ``ia3_linear``: the unfused module (scale, then linear; or linear, then scale)."""
    w = dense_weight_reference(weight, x.dtype)
    if is_feedforward:
        return F.linear(ia3_scale_reference(x, vectors, task_ids), w, bias)
    y = F.linear(x, w, bias)
    return ia3_scale_reference(y, vectors, task_ids)
