"""``fastpeft.patch(peft_model)``: run an existing peft model's LoRA and (IA)^3 layers through the fused ops.

The peft model keeps its modules and parameters (same objects, so optimizers, checkpoints and
``save_pretrained`` are unaffected); only each adapter layer's ``forward`` is replaced by one that
calls fastpeft's fused op (``fastpeft.ops.lora_linear``, ``fastpeft.ops.ia3_linear``) with that
layer's own weights. ``unpatch`` restores peft's forward.

A patched layer decides on *every* forward whether the fused op computes exactly what peft's
forward would: the adapters active on it now (peft's adapter lifecycle can add, switch, merge,
disable or delete adapters at any time), the kind of each (DoRA, ``lora_bias`` ...), extra forward
arguments (``adapter_names=`` mixed batches), hooks on the base layer (accelerate's live there) and
whether the base weight needs a gradient. When it does not, the layer runs peft's own forward
(``type(layer).forward``), so a patched model never computes anything peft would not. The check is
a handful of dict reads (about 3 us a layer call on the CPU). Layers of classes the fused ops cannot
run at all keep peft's forward untouched. Every layer on peft's path is reported with its reason
(in the returned report, and as a warning; at forward time as a warning too, once per layer and
reason, and in ``explain(model)``). FSDP1 (``use_orig_params=True``) hands a frozen base in as
flat-parameter views that require grad; those still run fused (see ``fastpeft.nn.base.frozen_base``).

Each family is (peft layer class, static reason, per-forward reason, fused forward): LoRA's lives
here, (IA)^3's in ``patch_ia3``.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections import Counter

from torch import nn
from torch.nn.modules import module as _torch_module

from fastpeft.integrations import patch_grouping, patch_ia3, patch_lora_embedding
from fastpeft.integrations.grouping import _GROUP, drop_group
from fastpeft.nn import base as _frozen
from fastpeft.nn.base import frozen_base  # noqa: F401  (patch_ia3 and the fused forwards use it)
from fastpeft.nn.base import base_layer_problem, keep_standard_4bit_layout
from fastpeft.nn.dora import fused_dora_forward
from fastpeft.nn.lora import fused_lora_forward

_MARK = "_fastpeft_patched"
_REASON = "_fastpeft_reason"  # the reason of the latest forward that ran peft's path (None: fused)

# Reasons for peft's path that are peft's ordinary adapter states, not a missed fusion: no warning.
BENIGN_REASONS = ("adapters are disabled", "adapters are merged into the base weight", "no active adapter on this layer")

_WARNED = "_fastpeft_warned"  # the reasons this layer warned about already


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did.

    ``patched``: layers this call switched to fastpeft's forward and that run the fused op now.
    ``already_patched``: layers an earlier ``patch`` switched (left as they are, state re-checked).
    ``skipped``: module name -> reason, for every adapter layer that runs peft's forward now.
    ``deferred``: the skipped layers that do carry fastpeft's forward: they run the fused op again
    as soon as their state allows it (another active adapter, adapters re-enabled, hooks removed).
    ``families``: each adapter layer's family ("LoRA", "IA3", or peft's name for other methods).
    ``groups``: patched LoRA layers that share an input and run as one fused op (when they can)."""

    patched: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)  # module name -> reason
    families: dict = dataclasses.field(default_factory=dict)  # module name -> family
    already_patched: list = dataclasses.field(default_factory=list)
    deferred: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)  # lists of LoRA layer names run as one op

    def summary(self) -> str:
        """One line of counts, then one line per reason a layer was left to peft."""
        fused = Counter(self.families.get(name, "?") for name in self.patched)
        per_family = ", ".join(f"{family} {count}" for family, count in sorted(fused.items()))
        lines = [f"fastpeft.patch: {len(self.patched)} layers fused ({per_family or 'none'}), "
                 f"{len(self.skipped)} left to peft"]  # fmt: skip
        if self.already_patched:
            lines[0] += f", {len(self.already_patched)} already patched"
        for reason, count in Counter(self.skipped.values()).most_common():
            lines.append(f"  {count} x {reason}")
        return "\n".join(lines)


# ---- checks shared by the families -----------------------------------------------------------------


def _forward_replaced(module: nn.Module) -> bool:
    """Whether the instance carries its own ``forward`` other than its class's (accelerate leaves the
    class's forward, bound, behind when it removes its hook)."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return False
    return not (getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module)


# The per-forward checks below read instance dicts directly: nn.Module.__getattr__ costs about a
# microsecond a lookup, and a large model runs these checks hundreds of times per step.


def _has_hooks(module: nn.Module) -> bool:
    tm = _torch_module
    state = module.__dict__
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or state.get("_hf_hook") is not None
        or ("forward" in state and _forward_replaced(module))  # a wrapped forward (accelerate's add_hook_to_module)
        or tm._global_forward_hooks or tm._global_forward_pre_hooks
        or tm._global_backward_hooks or tm._global_backward_pre_hooks
    )  # fmt: skip


def base_trains(base: nn.Module):
    """The name of the base layer's tensor that needs a gradient (peft's forward gives it one, the
    fused ops do not), or None. FSDP1 views of frozen parameters do not count."""
    return _frozen.trainable_base_tensor(base)


def bnb_cpu_packed(base: nn.Module) -> bool:
    """bitsandbytes' CPU inference path (eval mode, no grad, AVX512-BF16) repacks a 4-bit weight in
    place into its own layout on the first such forward; fastpeft reads the standard layout only."""
    quant_state = getattr(_frozen.tensor_of(base, "weight"), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def tuner_layer_class() -> type:
    """peft's ``BaseTunerLayer`` (imported once)."""
    global _TUNER_LAYER
    if _TUNER_LAYER is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        _TUNER_LAYER = BaseTunerLayer
    return _TUNER_LAYER


_TUNER_LAYER = None
_DORA_CLASSES = None


def common_forward_problem(layer, args: tuple, kwargs: dict, base=None):
    """The per-forward checks every family shares: why peft's forward must run this call (or None)."""
    if args or kwargs:
        if "adapter_names" in kwargs:
            return "mixed-adapter batch (adapter_names=)"
        return "extra forward arguments"
    if layer._disable_adapters:
        return "adapters are disabled"
    if layer.merged_adapters:
        return "adapters are merged into the base weight"
    if base is None:
        base = layer._modules["base_layer"]
    if type(base) is not nn.Linear:
        if isinstance(base, tuner_layer_class()):
            return f"base layer is another adapter layer ({type(base).__name__}: mixed adapter types)"
        if bnb_cpu_packed(base):
            return "bitsandbytes repacked the 4-bit weight for its CPU inference kernel (layout fastpeft does not read)"
    if _has_hooks(base):
        return "the base layer has hooks (run by peft's forward)"
    trains = base_trains(base)
    if trains is not None:
        return f"the base layer's {trains} requires grad (unfrozen base): peft's forward gives it its gradient"
    return None


def single_plain_adapter(layer, container, allow_dora: bool = False):
    """(the one active adapter of ``container`` on ``layer``, None), or (None, why the fused op cannot
    run it): no active adapter, several, or a LoRA variant (other than DoRA with ``allow_dora``)."""
    adapters = present_active_adapters(layer, container)
    if not adapters:
        return None, "no active adapter on this layer"
    if len(adapters) > 1:
        return None, f"{len(adapters)} active adapters on one layer"
    adapter = adapters[0]
    if adapter in layer.lora_variant:
        reason = (_dora_reason(layer, adapter) if allow_dora
                  else f"LoRA variant {type(layer.lora_variant[adapter]).__name__} (e.g. DoRA)")  # fmt: skip
        if reason is not None:
            return None, reason
    return adapter, None


def _dora_reason(layer, adapter) -> str | None:
    """None when adapter ``adapter`` of a LoRA Linear layer is peft's plain DoRA (the fused DoRA op
    runs it), else why not."""
    DoraLinearVariant, DoraLinearLayer = _dora_classes()
    variant = layer.lora_variant[adapter]
    if type(variant) is not DoraLinearVariant:
        return f"LoRA variant {type(variant).__name__}"
    magnitude = layer._modules.get("lora_magnitude_vector")
    dora = magnitude._modules.get(adapter) if magnitude is not None else None
    if type(dora) is not DoraLinearLayer or dora.fan_in_fan_out:
        return "DoRA layer that is not peft's plain DoraLinearLayer"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return "DoRA with ephemeral_gpu_offload"
    return None


def _dora_classes() -> tuple:
    """peft's (DoraLinearVariant, DoraLinearLayer), imported once (the check runs on every forward)."""
    global _DORA_CLASSES
    if _DORA_CLASSES is None:
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.tuners.lora.variants import DoraLinearVariant

        _DORA_CLASSES = (DoraLinearVariant, DoraLinearLayer)
    return _DORA_CLASSES


def present_active_adapters(layer, container) -> list:
    """The active adapters that exist on this layer (peft skips the others)."""
    active = layer._active_adapter  # peft's active_adapters, without the property
    return [active] if isinstance(active, str) and active in container else (
        [] if isinstance(active, str) else [a for a in active if a in container])  # fmt: skip


def note_fallback(layer, reason: str) -> None:
    """Remember why this call runs peft's forward and warn, once per layer and reason (Python's
    warning filter then shows each message once), except for peft's own states: disabled, merged,
    no adapter on the layer."""
    state = layer.__dict__
    if state.get(_REASON) != reason:
        state[_REASON] = reason
    if reason not in BENIGN_REASONS and reason not in state.setdefault(_WARNED, set()):
        state[_WARNED].add(reason)
        warnings.warn(f"fastpeft: a patched {type(layer).__name__} layer runs peft's forward: {reason}", stacklevel=3)


def note_fused(layer) -> None:
    """This call runs the fused op."""
    if layer.__dict__.get(_REASON) is not None:
        layer.__dict__[_REASON] = None


# ---- LoRA ------------------------------------------------------------------------------------------


def _lora_layer_types() -> tuple:
    from peft.tuners.lora import layer as lora_layer

    linear_types = (lora_layer.Linear,)
    try:
        from peft.tuners.lora import bnb as lora_bnb

        bnb_types = (getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None))
        linear_types += tuple(t for t in bnb_types if t is not None)
    except ImportError:
        pass
    return linear_types


def _reason_not_fusable(module) -> str | None:
    """Why fastpeft can never run this LoRA layer (its class or its base), or None."""
    # Exact classes: a subclass (AdaLoRA's SVDLinear, ...) computes something else in its forward.
    if patch_lora_embedding.is_embedding_layer(module):
        return patch_lora_embedding.reason_not_fusable(module)
    if type(module) not in _lora_layer_types():
        return f"{type(module).__name__} LoRA layers are not fused (only Linear / Linear4bit / Linear8bitLt / Embedding)"
    return _lora_base_reason(module)


def _lora_base_reason(module) -> str | None:
    base = module.base_layer
    if isinstance(base, tuner_layer_class()):
        return f"base layer is another adapter layer ({type(base).__name__}: mixed adapter types)"
    problem = base_layer_problem(base)
    if problem is not None:
        return f"base layer: {problem}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    return None


def lora_forward_problem(layer, args=(), kwargs=None):
    """(adapter, None) when the fused op computes exactly what peft's forward would for this call,
    else (None, reason)."""
    modules = layer._modules
    if type(layer) is patch_lora_embedding.embedding_class():
        return patch_lora_embedding.forward_problem(layer, args, kwargs)
    base = modules["base_layer"]
    reason = common_forward_problem(layer, args, kwargs or {}, base)
    if reason is not None:
        return None, reason
    if type(base) is not nn.Linear or layer.__dict__.get("fan_in_fan_out", False):
        reason = _lora_base_reason(layer)  # the base may have been swapped (mixed adapter types)
        if reason is not None:
            return None, reason
    lora_A = modules["lora_A"]._modules
    adapter, reason = single_plain_adapter(layer, lora_A, allow_dora=True)
    if reason is not None:
        return None, reason
    down, up = lora_A[adapter], modules["lora_B"]._modules[adapter]
    if type(down) is not nn.Linear or type(up) is not nn.Linear:
        return None, f"LoRA factors {type(down).__name__} / {type(up).__name__} (not nn.Linear)"
    if up._parameters.get("bias") is not None or down._parameters.get("bias") is not None:
        return None, "lora_bias=True"
    dropout = modules["lora_dropout"]._modules[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return None, f"dropout module {type(dropout).__name__}"
    return adapter, None


def _fused_forward(self, x, *args, **kwargs):
    group = self.__dict__.get(_GROUP)  # projections that share x (patch_grouping)
    if group is not None and not args and not kwargs:
        return group.member_forward(self, x)
    return _fused_forward_alone(self, x, *args, **kwargs)


def _fused_forward_alone(self, x, *args, **kwargs):
    adapter, reason = lora_forward_problem(self, args, kwargs)
    if reason is not None:
        note_fallback(self, reason)
        return type(self).forward(self, x, *args, **kwargs)
    note_fused(self)
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    base = frozen_base(self.base_layer)
    kind = "dense" if base is not self.base_layer else None
    if adapter in self.lora_variant:  # DoRA (lora_forward_problem let no other variant through)
        # peft's DoRA drops x only when the layer trains (and so does its dropout module)
        p = p if self.training else 0.0
        magnitude = self.lora_magnitude_vector[adapter].weight
        return fused_dora_forward(self, base, self.lora_A[adapter].weight, self.lora_B[adapter].weight, magnitude,
                                  self.scaling[adapter], p, x, kind)  # fmt: skip
    return fused_lora_forward(base, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, x,
                              kind)  # fmt: skip


# ---- patching --------------------------------------------------------------------------------------


def _families() -> list:
    """(family, peft layer base class, static reason, per-forward reason, fused forward) per family."""
    from peft.tuners.lora import LoraLayer

    return [
        ("LoRA", LoraLayer, _reason_not_fusable, lora_forward_problem, _fused_forward),
        ("IA3", patch_ia3.layer_class(), patch_ia3.reason_not_fusable, patch_ia3.forward_problem,
         patch_ia3.fused_forward),
    ]  # fmt: skip


def _family_of(module, families):
    # AdaLoRA layers are LoraLayers too: name them by their own package.
    family = next((f for f in families if isinstance(module, f[1])), None)
    package = type(module).__module__.split(".")
    tuner = package[2] if len(package) > 2 and package[:2] == ["peft", "tuners"] else None
    if family is not None and (tuner is None or tuner == family[0].lower()):
        return family
    return None


def _other_tuner_name(module) -> str | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return None
    package = type(module).__module__.split(".")
    return package[2] if len(package) > 2 and package[:2] == ["peft", "tuners"] else type(module).__name__


def patch(peft_model: nn.Module, warn: bool = True, group_projections=True) -> PatchReport:
    """Switch every LoRA (Linear, Linear4bit, Linear8bitLt, Embedding) and (IA)^3 layer of a peft
    model to fastpeft's fused kernels, in place.

    ``group_projections``: patched LoRA Linear layers that read the same input (q/k/v, gate/up)
    run as one fused op (``fastpeft.integrations.patch_grouping``), found by one example forward of
    ``peft_model.dummy_inputs`` (or of the dict of inputs given here); False: one op per layer. In
    training, a group draws one dropout mask of x for all members, where peft draws one per layer.

    Safe to call again at any time (after ``add_adapter``, ``set_adapter`` ...): new layers are
    switched, layers patched before are left as they are and their state re-checked. Returns a
    ``PatchReport``; layers that run peft's forward are listed there with the reason (and, with
    ``warn``, in a warning when a reason is more than peft's own disabled / merged state).
    """
    families = _families()
    report = PatchReport()
    for name, module in peft_model.named_modules():
        family = _family_of(module, families)
        if family is None:
            other = _other_tuner_name(module)
            if other is not None:
                report.families[name] = other
                report.skipped[name] = (f"{other} layers ({type(module).__module__}.{type(module).__name__}) are not "
                                        "fused (fastpeft fuses LoRA and (IA)^3)")
            continue
        family_name, _, reason_not_fusable, forward_problem, fused_forward = family
        report.families[name] = family_name
        already = getattr(module, _MARK, False)
        if not already:
            reason = reason_not_fusable(module)
            if reason:
                report.skipped[name] = reason
                continue
            if _forward_replaced(module):  # someone else (accelerate ...) wrapped this layer's forward
                report.skipped[name] = "the layer's forward is already replaced (a hook wraps it)"
                continue
            if family_name == "LoRA" and patch_lora_embedding.is_embedding_layer(module):
                fused_forward = patch_lora_embedding.fused_forward
            module.forward = types.MethodType(fused_forward, module)
            setattr(module, _MARK, True)
            keep_standard_4bit_layout(module.get_base_layer())  # peft's path may run bitsandbytes' forward
        _, reason = forward_problem(module)
        if reason is not None:
            report.skipped[name] = reason
            report.deferred.append(name)
        elif already:
            report.already_patched.append(name)
        else:
            report.patched.append(name)
    if not isinstance(group_projections, (bool, dict)):
        raise TypeError(f"group_projections must be True, False or a dict of example inputs, got {group_projections!r}")
    if group_projections is not False:
        linear = {n: m for n, m in peft_model.named_modules()
                  if getattr(m, _MARK, False) and type(m) in _lora_layer_types()}  # fmt: skip
        report.groups = patch_grouping.group_patched(
            peft_model, linear, lora_forward_problem, _fused_forward_alone, note_fused,
            None if group_projections is True else group_projections)  # fmt: skip
    else:
        patch_grouping.ungroup(peft_model)
    if warn and any(r not in BENIGN_REASONS for r in report.skipped.values()):
        warnings.warn(report.summary(), stacklevel=2)
    return report


def explain(peft_model: nn.Module) -> dict:
    """Module name -> why that patched layer would run peft's forward on a plain call now (None:
    the fused op). Changes nothing."""
    families = _families()
    out = {}
    for name, module in peft_model.named_modules():
        if getattr(module, _MARK, False):
            family = _family_of(module, families)
            out[name] = family[3](module)[1] if family is not None else "not a fused family"
    return out


def unpatch(peft_model: nn.Module) -> int:
    """Give every patched layer its peft forward back; returns how many were restored."""
    restored = 0
    for module in peft_model.modules():
        if getattr(module, _MARK, False):
            del module.forward  # the instance attribute; the class's (peft's) forward shows again
            drop_group(module)
            delattr(module, _MARK)
            module.__dict__.pop(_REASON, None)
            module.__dict__.pop(_WARNED, None)
            restored += 1
    return restored
