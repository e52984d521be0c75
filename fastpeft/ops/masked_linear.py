"""A linear layer whose weight trains at a sparse mask: ``y = x W^T + b`` with ``W``'s gradient
computed at the masked entries only.

Sparse fine-tuning (FishMask) trains a few entries of each dense weight. The plain practice
computes the full weight gradient ``grad_out^T x`` -- as many FLOPs as the forward GEMM -- and
multiplies it by a 0/1 mask. ``masked_weight_linear`` computes the gradient at the mask's flat
indices only, by the sampled product ``fastpeft.sparse_delta_weight_grad`` (the sparse-delta
backward's kernel; above its density crossover it is one GEMM and a gather), and returns it as the
dense masked gradient: zero everywhere else, the values at the indices. So ``.grad`` is exactly
what the dense-masked practice produces (clipping, GradScaler, gradient accumulation and any
optimizer work unchanged), without the dense weight-gradient GEMM.

Saved for backward: what ``F.linear`` saves (x when the weight needs a gradient, the weight when x
does) and the indices by reference. The op is ``torch.ops.fastpeft.masked_weight_linear`` (autograd
in C++, csrc/masked_linear/); this module holds its fake kernels, the wrapper and the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ---- fake (meta) kernels (autograd is in C++: csrc/masked_linear/masked_linear_autograd.cpp) ------


@torch.library.register_fake("fastpeft::masked_weight_linear")
def _(x, weight, bias, indices):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastpeft::masked_weight_linear_backward")
def _(grad_out, x, weight, indices, output_mask):
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,))
    grad_bias = x.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_weight, grad_bias


# ---- public functions ----------------------------------------------------------------------------


def masked_weight_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: torch.Tensor
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is computed at ``indices`` only.

    ``indices``: sorted unique flat int32/int64 indices into ``weight``'s [out, in] (a mask of
    ``fastpeft.optim``), on the weight's device. ``weight.grad`` receives the dense masked
    gradient -- ``(grad_out^T x)`` at the indices, zero elsewhere -- in the weight's dtype (the
    values are summed in float32 and rounded once). ``x`` and ``bias`` get their usual gradients.
    The indices are trusted to be validated (the masks of ``fastpeft.optim`` are); an index
    outside the weight is skipped.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"masked_weight_linear: weight must be a 2-D [out, in] tensor, got {_describe(weight)}")
    if not weight.is_floating_point():
        raise ValueError(f"masked_weight_linear: weight must be floating point, got {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"masked_weight_linear: x has {x.shape[-1]} features, the weight takes {weight.shape[1]}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masked_weight_linear: indices must be a 1-D int32/int64 tensor, got {_describe(indices)}")
    if indices.device != weight.device:
        raise ValueError(f"masked_weight_linear: indices are on {indices.device}, the weight on {weight.device}")
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: the product in the autocast dtype; the casts are differentiable,
        # so the float32 weight receives the masked gradient through its cast.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.fastpeft.masked_weight_linear(x, weight, bias, indices)


def masked_weight_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear`` with the weight's dense gradient multiplied by the 0/1 mask
    (the dense-masked practice)."""
    if not weight.requires_grad:
        return F.linear(x, weight, bias)
    dense = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    dense[indices.long()] = 1
    masked = weight.view_as(weight)  # a graph node of its own, so the hook sees only this use's gradient
    masked.register_hook(lambda grad: grad * dense.view_as(grad))
    return F.linear(x, masked, bias)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor"
    return type(t).__name__
