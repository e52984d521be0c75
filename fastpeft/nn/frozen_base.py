"""Frozen base layers under FSDP1: what the fused layers hand the ops.

FSDP1 with ``use_orig_params=True`` swaps a wrapped unit's parameters for views of one flat
parameter during forward; the views require grad as soon as any parameter of the unit trains (an
adapter next to its frozen base), although FSDP gives the frozen ones no gradient. The fused ops
treat the base as frozen (``ia3_linear`` refuses a base that requires grad), so the layers give
them the base's tensors detached in exactly that case, and nowhere else: a base parameter that
really trains is passed as it is.
"""

from __future__ import annotations

import torch
from torch import nn


def tensor_of(module: nn.Module, name: str):
    """``module.<name>`` as a tensor (None if absent), without nn.Module's slow ``__getattr__``;
    also finds the plain tensors FSDP1 puts in place of parameters during forward."""
    t = module._parameters.get(name)
    if t is None:
        t = module.__dict__.get(name)
    return t if isinstance(t, torch.Tensor) else None


def is_fsdp1_frozen_view(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (``module.<name>`` now) is FSDP1's view of a flat parameter standing in for
    a parameter that does not require grad."""
    flat = tensor._base
    if flat is None or not getattr(flat, "_is_flat_param", False):  # FlatParameter instances are plain Parameters
        return False
    infos, params = getattr(flat, "_param_infos", None), getattr(flat, "_params", None)
    if infos is None or params is None:
        return False
    for info, param in zip(infos, params):
        if info.module is module and info.param_name == name:
            return not param.requires_grad
    return False


def trainable_base_tensor(base: nn.Module):
    """The name of ``base``'s weight or bias when it needs a gradient (FSDP1 views of frozen
    parameters do not), else None."""
    for name in ("weight", "bias"):
        t = tensor_of(base, name)
        if t is not None and t.requires_grad and not is_fsdp1_frozen_view(base, name, t):
            return name
    return None


class FrozenDenseView:
    """A dense base layer's weight and bias, detached (``weight`` / ``bias`` attributes only)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight, bias):
        self.weight = weight
        self.bias = bias


def frozen_base(base: nn.Module):
    """``base``, or a ``FrozenDenseView`` of it with detached tensors when its weight or bias
    requires grad only as FSDP1 views of frozen parameters. A base tensor that really trains leaves
    ``base`` as it is (the op then decides: ``ia3_linear`` raises)."""
    w, b = tensor_of(base, "weight"), tensor_of(base, "bias")
    w_view = w is not None and w.requires_grad
    b_view = b is not None and b.requires_grad
    if not (w_view or b_view):
        return base
    if (w_view and not is_fsdp1_frozen_view(base, "weight", w)) or (b_view and not is_fsdp1_frozen_view(base, "bias", b)):
        return base
    return FrozenDenseView(w.detach(), None if b is None else b.detach())
