"""The (IA)^3 part of ``fastpeft.patch``: peft ``ia3.Linear`` / ``ia3.Linear4bit`` layers on the fused op.

A patched layer keeps its peft modules and parameters; its forward calls ``fastpeft.ops.ia3_linear``
(through ``fastpeft.nn.ia3.fused_ia3_forward``, the path ``IA3Linear`` runs) with the layer's own
base layer and ``ia3_l`` vectors.
"""

from __future__ import annotations

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


def reason_not_fusable(module) -> str | None:
    """Why the fused op cannot run this peft (IA)^3 layer, or None if it can."""
    if not isinstance(module, _fusable_types()):
        return f"{type(module).__name__} (IA)^3 layers are not fused (only Linear / Linear4bit / Linear8bitLt)"
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "is_target_conv_1d_layer", False):
        return f"fan_in_fan_out=True (base layer {type(base).__name__})"
    problem = base_layer_problem(base)
    if problem is not None:
        return f"base layer: {problem}"
    return None


def fused_forward(self, x, *args, **kwargs):
    """peft's ``ia3.Linear.forward`` on the fused op: several active adapters multiply their vectors,
    as peft does (the product keeps autograd to each vector)."""
    adapters = [a for a in self.active_adapters if a in self.ia3_l]
    # Paths peft handles itself: extra arguments, merged or disabled adapters, no active vector.
    if args or kwargs or self.disable_adapters or self.merged or not adapters:
        return type(self).forward(self, x, *args, **kwargs)
    vectors = self.ia3_l[adapters[0]]
    for adapter in adapters[1:]:
        vectors = vectors.flatten() * self.ia3_l[adapter].flatten()
    return fused_ia3_forward(self.get_base_layer(), vectors, self.is_feedforward, x)
