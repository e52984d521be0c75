"""Grouped LoRA projections in a model: the targeted projections that read the same input (q/k/v of
an attention block, gate/up of a gated MLP) run as one ``LoRAProjectionGroup``: one fused op, one
read of x, one shrink GEMM over the stacked A matrices, and in backward one GEMM for the adapters'
input gradient.

Finding the groups. From the model's structure as it runs, not from module names: one forward of a
small example input (``model.dummy_inputs`` of a transformers model, or the inputs given) under
``torch.no_grad`` with a pre-hook on every ``LoRALinear`` records which tensor object each one
receives. Layers that receive the same tensor object, are children of the same parent module and
can share one fused op (same base kind, frozen-weight format and dtype, adapter dtype, dropout)
form a group, in the order they ran. The example forward runs in training mode (bitsandbytes
repacks 4-bit weights on an eval-mode CPU forward) with the RNG state saved and restored, and every
module's mode is put back afterwards.

Running the groups. Each ``LoRALinear`` stays where it is in the module tree, with its parameters:
parameter names, ``state_dict`` keys, checkpoints and peft interop are exactly as without grouping.
The group object is kept in the members' ``__dict__`` (not a submodule, so it adds no names). The
parent module's forward calls its projections one after another, as before; the first member
called with an input ``x`` runs the whole group on ``x`` and leaves every other member its output,
tagged with ``x`` itself; a member then called with that same tensor object returns it (and drops
it), one called with any other input runs the group again. So:

* Outputs and gradients are those of the members run one by one (without dropout: equal to peft's
  to fp32 tolerance); it does not matter which member the parent calls first.
* Gradient checkpointing: the recomputation in backward calls the members again on the recomputed
  input, which runs the group again; the same tensors are saved in both passes, which is what
  non-reentrant checkpointing checks.
* ``torch.compile``: the hand-over is a Python attribute on the member and an ``is`` test of two
  tensors, both of which dynamo traces (one graph for the group's op; tested with fullgraph).
* A member whose hand-over is never collected (a parent that skips a projection) keeps that output
  alive until the member next runs; copies and pickles of the model leave hand-overs out.
* Merged or disabled members (``merge_adapter``, ``disable_adapter()``) make the group run each
  member on its own; multi-adapter layouts (``add_adapter``) and unloading replace the layers, and
  the groups with them.

Dropout: a group draws one mask of x that all members share, where peft draws one per projection
(so with ``lora_dropout > 0`` the randomness differs from peft's; the expectation is the same).
``get_peft_model(..., group_projections=False)`` keeps one fused op per projection.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import nn

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup

_GROUP = "_shared_input_group"
_HANDOVER = "_grouped_output"


def _nothing():
    return None


class _Handover:
    """An output the group left for a member, with the input it was computed from. Copies and
    pickles of a model drop it (it holds graph tensors, which cannot be deep-copied)."""

    __slots__ = ("x", "out")

    def __init__(self, x, out):
        self.x = x
        self.out = out

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_nothing, ())


class HandoverGroup:
    """Members that read the same input, run together: the first member called with ``x`` runs
    ``run_all(x)`` and leaves every other member its output, tagged with ``x`` (see the module
    docstring). Subclasses say how the group runs and how one member runs alone."""

    def __init__(self, layers):
        self.layers = list(layers)

    def run_all(self, x: torch.Tensor):
        """Every member's output for ``x`` (a tuple in member order), or None: run each alone now."""
        raise NotImplementedError

    def run_alone(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def member_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``: the output the group left for ``layer`` if it ran on this very ``x``, else the
        group is run on ``x`` (or, when it cannot run now, ``layer`` alone)."""
        handed = getattr(layer, _HANDOVER, None)
        if handed is not None:
            setattr(layer, _HANDOVER, None)
            if handed.x is x:
                return handed.out
        outs = self.run_all(x)
        if outs is None:
            return self.run_alone(layer, x)
        mine = None
        for member, out in zip(self.layers, outs):
            if member is layer:
                mine = out
            else:
                setattr(member, _HANDOVER, _Handover(x, out))
        return mine


class SharedInputGroup(HandoverGroup):
    """The runtime side of one group of ``LoRALinear`` layers: a ``LoRAProjectionGroup`` over the
    members (each member on its own while any is merged)."""

    def __init__(self, layers):
        super().__init__(layers)
        self.group = LoRAProjectionGroup(layers)

    def run_all(self, x):
        return None if any(m.merged for m in self.layers) else self.group(x)

    def run_alone(self, layer, x):
        return layer._ungrouped_forward(x)


def _format(layer: LoRALinear) -> tuple:
    """What must agree between members of one fused op."""
    key = (layer.lora_dropout, layer.lora_A.weight.dtype, layer.lora_B.weight.dtype, layer.lora_A.weight.device)
    return key + base_format(layer.base_layer, layer.base_kind)


def base_format(base: nn.Module, kind: str) -> tuple:
    """What must agree between the frozen bases of one grouped op: kind, weight format and dtypes."""
    key = (kind, base.bias is not None and base.bias.dtype)
    if kind == "4bit":
        state = base.weight.quant_state
        return key + (state.quant_type, state.blocksize, bool(getattr(state, "nested", False)),
                      getattr(base, "compute_dtype", None))  # fmt: skip
    return key + (base.weight.dtype,)


@contextlib.contextmanager
def _example_forward_state(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    devices = [] if not torch.cuda.is_available() else list(range(torch.cuda.device_count()))
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _example_inputs(model: nn.Module, inputs):
    if inputs is None:
        inputs = getattr(model, "dummy_inputs", None)
        if inputs is None:
            raise ValueError("the model has no dummy_inputs")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(inputs, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    raise TypeError(f"example inputs must be a dict of model(**inputs) arguments, got {type(inputs).__name__}")


def find_shared_input_groups(model: nn.Module, inputs: Optional[dict] = None, layers: Optional[dict] = None,
                             key=_format) -> list:  # fmt: skip
    """Lists of ``LoRALinear`` names (two or more each, in call order) that read the same input tensor
    in one forward of ``model(**inputs)`` (default: ``model.dummy_inputs``), are siblings and can
    share one fused op. Raises what the forward raises. ``layers`` (name -> module) and ``key`` (what
    must agree within a group) generalise it to other layer types (``fastpeft.patch``)."""
    if layers is None:
        # DoRA layers run alone: their output scaling needs their own base product and norm.
        layers = {n: m for n, m in model.named_modules() if type(m) is LoRALinear and not m.use_dora}
    names = {m: n for n, m in layers.items()}
    seen = []  # (input tensor, parent name, layer name) in call order; holding x keeps ids unique

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            seen.append((args[0], names[module].rpartition(".")[0], names[module]))

    example = _example_inputs(model, inputs)
    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        with _example_forward_state(model):
            model(**example)
    finally:
        for h in handles:
            h.remove()
    by_input = {}
    for x, parent, name in seen:
        by_input.setdefault((id(x), parent), []).append(name)
    modules = dict(model.named_modules())
    groups = []
    for members in by_input.values():
        members = list(dict.fromkeys(members))  # a layer called twice on one x counts once
        by_format = {}
        for name in members:
            by_format.setdefault(key(modules[name]), []).append(name)
        groups += [g for g in by_format.values() if len(g) > 1]
    return groups


def install_groups(model: nn.Module, make_group, inputs: Optional[dict] = None, layers: Optional[dict] = None,
                   key=_format, who: str = "fastpeft") -> list:  # fmt: skip
    """Find the groups (``find_shared_input_groups`` with ``layers`` and ``key``) and give each member
    its group, ``make_group(members)``; returns the groups as lists of names. If the example forward
    fails (a model whose forward needs more than ``dummy_inputs``), warns (naming ``who``, at the
    caller's caller) and groups nothing."""
    try:
        groups = find_shared_input_groups(model, inputs, layers=layers, key=key)
    except Exception as error:  # noqa: BLE001 (any failure of the example forward: run ungrouped)
        warnings.warn(
            f"{who} could not find the projections that share an input ({type(error).__name__}: {error}); "
            "every LoRA layer runs on its own. Pass group_projections=<example inputs dict> to group them.",
            stacklevel=4,
        )
        return []
    modules = dict(model.named_modules())
    for names in groups:
        members = [modules[n] for n in names]
        shared = make_group(members)
        for layer in members:
            layer.__dict__[_GROUP] = shared
            layer.__dict__[_HANDOVER] = None
    return groups


def drop_group(module: nn.Module) -> None:
    """Take ``module`` out of its group (and drop any output handed to it)."""
    module.__dict__.pop(_GROUP, None)
    module.__dict__.pop(_HANDOVER, None)


def group_projections(model: nn.Module, inputs: Optional[dict] = None) -> list:
    """Group the ``LoRALinear`` layers of ``model`` that read the same input (see the module docstring);
    returns the groups as lists of names. Layers already grouped are regrouped. If the example
    forward fails (a model whose forward needs more than ``dummy_inputs``), warns and groups nothing:
    pass ``inputs``."""
    ungroup_projections(model)
    return install_groups(model, SharedInputGroup, inputs)


def ungroup_projections(model: nn.Module) -> None:
    """Make every ``LoRALinear`` of ``model`` run on its own again (today's behaviour)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            drop_group(m)


def projection_groups(model: nn.Module) -> list:
    """The current groups of ``model`` as lists of ``LoRALinear`` names."""
    names = {m: n for n, m in model.named_modules()}
    groups = {}
    for m in model.modules():
        shared = m.__dict__.get(_GROUP) if isinstance(m, LoRALinear) else None
        if shared is not None:
            groups[id(shared)] = [names[layer] for layer in shared.layers if layer in names]
    return list(groups.values())
