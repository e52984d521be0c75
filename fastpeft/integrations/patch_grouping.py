"""Grouped projections for ``fastpeft.patch``: the patched peft LoRA layers that read the same input
(q/k/v, gate/up) run as one fused op (``fastpeft.ops.lora_linear_grouped``: one read of x, one
shrink GEMM over the stacked A matrices), as ``get_peft_model`` does for its own layers
(``fastpeft.integrations.grouping`` has the design: groups found from one example forward, outputs
handed over between members, parameter names and checkpoints untouched).

peft's adapter lifecycle can change any member at any time, so the group checks every member on
each call (the patched layer's own per-forward check, ``patch.lora_forward_problem``): it runs
grouped only when every member runs one plain LoRA adapter (no DoRA, no extra arguments), with the
same dropout probability and compatible bases; otherwise each member runs on its own and takes its
own path (fused alone, or peft's forward with its reason).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastpeft.integrations import grouping
from fastpeft.nn.base import base_kind, cast, frozen_base, output_dtype
from fastpeft.nn.lora import fused_lora_args
from fastpeft.ops.lora import lora_linear_grouped


def _dropout_p(layer, adapter) -> float:
    dropout = layer.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


class PatchedLoRAGroup(grouping.HandoverGroup):
    """Patched peft LoRA layers that read the same input."""

    def __init__(self, layers, check, run_alone, note_fused):
        super().__init__(layers)
        self._check, self._run_alone, self._note_fused = check, run_alone, note_fused

    def run_alone(self, layer, x):
        return self._run_alone(layer, x)

    def run_all(self, x):
        members = []
        for layer in self.layers:
            adapter, reason = self._check(layer)
            if reason is not None or adapter in layer.lora_variant:
                return None
            members.append((layer, adapter))
        if len({_dropout_p(layer, adapter) for layer, adapter in members}) != 1:
            return None
        args, kinds = [], set()
        for layer, adapter in members:
            base = frozen_base(layer.base_layer)
            kind = "dense" if base is not layer.base_layer else base_kind(base)
            kinds.add(kind)
            args.append(fused_lora_args(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, x, kind))
        if len(kinds) != 1 or len({a[0] for a in args}) != 1 or len({type(a[1]) for a in args}) != 1:
            return None
        if kinds == {"4bit"} and len({a[1].quant_type for a in args}) != 1:
            return None
        dtype, kind = args[0][0], kinds.pop()
        scalings = [layer.scaling[adapter] for layer, adapter in members]
        outs = lora_linear_grouped(cast(x, dtype), [a[1] for a in args], [a[2] for a in args],
                                   [a[3] for a in args], [a[4] for a in args], scalings,
                                   _dropout_p(*members[0]))  # fmt: skip
        for layer, _ in members:
            self._note_fused(layer)
        return tuple(cast(o, output_dtype(x, dtype, kind)) for o in outs)


def _key(layer) -> tuple:
    base = layer.base_layer
    return (type(layer),) + grouping.base_format(base, base_kind(base))


def ungroup(model: nn.Module) -> None:
    """Drop every group of patched layers (they run on their own again)."""
    for m in model.modules():
        if isinstance(m.__dict__.get(grouping._GROUP), PatchedLoRAGroup):
            grouping.drop_group(m)


def group_patched(model: nn.Module, layers: dict, check, run_alone, note_fused, inputs: Optional[dict] = None) -> list:
    """Group the patched LoRA ``layers`` (name -> peft layer) of ``model`` that read the same input;
    returns the groups as lists of names. If the example forward fails, warns and groups nothing."""
    ungroup(model)
    if len(layers) < 2:
        return []
    return grouping.install_groups(model, lambda members: PatchedLoRAGroup(members, check, run_alone, note_fused),
                                   inputs, layers=layers, key=_key, who="fastpeft.patch")  # fmt: skip
