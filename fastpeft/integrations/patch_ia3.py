"""The (IA)^3 part of ``fastpeft.patch``: peft ``ia3.Linear`` / ``Linear4bit`` / ``Linear8bitLt`` layers on the fused op.

A patched layer keeps its peft modules and parameters; its forward calls ``fastpeft.ops.ia3_linear``
(through ``fastpeft.nn.ia3.fused_ia3_forward``, the path ``IA3Linear`` runs) with the layer's own
base layer and ``ia3_l`` vectors, after the per-forward checks of ``patch.common_forward_problem``
(else it runs peft's forward).
"""

from __future__ import annotations

from torch import nn

from fastpeft.nn.ia3 import fused_ia3_forward
from fastpeft.nn.base import base_layer_problem


def layer_class() -> type:
    """peft's base class of every (IA)^3 layer."""
    from peft.tuners.ia3 import IA3Layer

    return IA3Layer


def _fusable_types() -> tuple:
    from peft.tuners.ia3 import layer as ia3_layer

    types_ = (ia3_layer.Linear,)
    try:
        from peft.tuners.ia3 import bnb as ia3_bnb

        types_ += tuple(t for t in (getattr(ia3_bnb, "Linear4bit", None), getattr(ia3_bnb, "Linear8bitLt", None))
                        if t is not None)  # fmt: skip
    except ImportError:
        pass
    return types_


def _base_reason(module) -> str | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = module.base_layer
    if isinstance(base, BaseTunerLayer):
        return f"base layer is another adapter layer ({type(base).__name__}: mixed adapter types)"
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "is_target_conv_1d_layer", False):
        return f"fan_in_fan_out=True (base layer {type(base).__name__})"
    problem = base_layer_problem(base)
    if problem is not None:
        return f"base layer: {problem}"
    return None


def reason_not_fusable(module) -> str | None:
    """Why the fused op can never run this peft (IA)^3 layer (its class or base), or None if it can."""
    if type(module) not in _fusable_types():  # exact: a subclass may compute something else
        return f"{type(module).__name__} (IA)^3 layers are not fused (only Linear / Linear4bit / Linear8bitLt)"
    return _base_reason(module)


def forward_problem(layer, args=(), kwargs=None):
    """(active adapters on the layer, None) when the fused op computes what peft's forward would for
    this call, else (None, reason)."""
    from fastpeft.integrations.patch import common_forward_problem, present_active_adapters

    modules = layer._modules
    base = modules["base_layer"]
    reason = common_forward_problem(layer, args, kwargs or {}, base)
    if reason is None:
        state = layer.__dict__
        if type(base) is not nn.Linear or state.get("fan_in_fan_out") or state.get("is_target_conv_1d_layer"):
            reason = _base_reason(layer)
    if reason is not None:
        return None, reason
    adapters = present_active_adapters(layer, modules["ia3_l"])
    if not adapters:
        return None, "no active adapter on this layer"
    return adapters, None


def fused_forward(self, x, *args, **kwargs):
    """peft's ``ia3.Linear.forward`` on the fused op: several active adapters multiply their vectors,
    as peft does (the product keeps autograd to each vector)."""
    from fastpeft.integrations.patch import frozen_base, note_fallback, note_fused

    adapters, reason = forward_problem(self, args, kwargs)
    if reason is not None:
        note_fallback(self, reason)
        return type(self).forward(self, x, *args, **kwargs)
    note_fused(self)
    vectors = self.ia3_l[adapters[0]]
    for adapter in adapters[1:]:
        vectors = vectors.flatten() * self.ia3_l[adapter].flatten()
    base = frozen_base(self.base_layer)
    return fused_ia3_forward(base, vectors, self.is_feedforward, x, kind="dense" if base is not self.base_layer else None)
