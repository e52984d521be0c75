"""``fastpeft.patch(peft_model)``: run an existing peft model's LoRA and (IA)^3 layers through the fused ops.

The peft model keeps its modules and parameters (same objects, so optimizers, checkpoints and
``save_pretrained`` are unaffected); only each adapter layer's ``forward`` is replaced by one that
calls fastpeft's fused op (``fastpeft.ops.lora_linear``, ``fastpeft.ops.ia3_linear``) with that
layer's own weights. ``unpatch`` restores peft's forward. Every adapter layer that cannot be
accelerated keeps peft's forward and is reported with its reason (in the returned report and as a
warning), never skipped silently.

Each family is (peft layer class, why-not-fusable, fused forward): LoRA's lives here, (IA)^3's in
``patch_ia3``.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections import Counter

from torch import nn

from fastpeft.integrations import patch_ia3
from fastpeft.nn.base import base_layer_problem
from fastpeft.nn.lora import fused_lora_forward

_MARK = "_fastpeft_patched"


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: the layers now fused and, per layer left on peft's path, the reason;
    ``families`` gives each of those layers' adapter family ("LoRA", "IA3")."""

    patched: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)  # module name -> reason
    families: dict = dataclasses.field(default_factory=dict)  # module name -> family

    def summary(self) -> str:
        """One line of counts, then one line per reason a layer was left to peft."""
        fused = Counter(self.families.get(name, "?") for name in self.patched)
        per_family = ", ".join(f"{family} {count}" for family, count in sorted(fused.items()))
        lines = [f"fastpeft.patch: {len(self.patched)} layers fused ({per_family or 'none'}), "
                 f"{len(self.skipped)} left to peft"]  # fmt: skip
        for reason, count in Counter(self.skipped.values()).most_common():
            lines.append(f"  {count} x {reason}")
        return "\n".join(lines)


def _reason_not_fusable(module) -> str | None:
    from peft.tuners.lora import layer as lora_layer

    linear_types = (lora_layer.Linear,)
    try:
        from peft.tuners.lora import bnb as lora_bnb

        bnb_types = (getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None))
        linear_types += tuple(t for t in bnb_types if t is not None)
    except ImportError:
        pass
    if not isinstance(module, linear_types):
        return f"{type(module).__name__} LoRA layers are not fused (only Linear / Linear4bit / Linear8bitLt)"
    problem = base_layer_problem(module.get_base_layer())
    if problem is not None:
        return f"base layer: {problem}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    for adapter in module.active_adapters:
        if module.lora_variant.get(adapter) is not None:
            return f"LoRA variant {type(module.lora_variant[adapter]).__name__} (e.g. DoRA)"
        if module.lora_bias.get(adapter, False):
            return "lora_bias=True"
        dropout = module.lora_dropout[adapter]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return f"dropout module {type(dropout).__name__}"
    return None


def _fused_forward(self, x, *args, **kwargs):
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    # Paths peft handles itself: extra arguments (mixed-adapter batches ...), merged or disabled
    # adapters, several active adapters at once.
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    adapter = adapters[0]
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return fused_lora_forward(
        self.get_base_layer(), self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, x
    )


def _families() -> list:
    """(family, peft layer base class, reason_not_fusable, fused forward) for every family patch knows."""
    from peft.tuners.lora import LoraLayer

    return [
        ("LoRA", LoraLayer, _reason_not_fusable, _fused_forward),
        ("IA3", patch_ia3.layer_class(), patch_ia3.reason_not_fusable, patch_ia3.fused_forward),
    ]


def patch(peft_model: nn.Module, warn: bool = True) -> PatchReport:
    """Switch every LoRA and (IA)^3 layer of a peft model to fastpeft's fused kernels, in place.

    Returns a ``PatchReport``; layers that stay on peft's path are listed there with the reason
    (and, with ``warn``, in a warning). Patching twice leaves patched layers as they are.
    """
    families = _families()
    report = PatchReport()
    for name, module in peft_model.named_modules():
        if getattr(module, _MARK, False):
            continue
        family = next((f for f in families if isinstance(module, f[1])), None)
        if family is None:
            continue
        family_name, _, reason_not_fusable, fused_forward = family
        report.families[name] = family_name
        reason = reason_not_fusable(module)
        if reason:
            report.skipped[name] = reason
            continue
        module.forward = types.MethodType(fused_forward, module)
        setattr(module, _MARK, True)
        report.patched.append(name)
    if warn and report.skipped:
        warnings.warn(report.summary(), stacklevel=2)
    return report


def unpatch(peft_model: nn.Module) -> int:
    """Give every patched layer its peft forward back; returns how many were restored."""
    restored = 0
    for module in peft_model.modules():
        if getattr(module, _MARK, False):
            del module.forward  # the instance attribute; the class's (peft's) forward shows again
            delattr(module, _MARK)
            restored += 1
    return restored
