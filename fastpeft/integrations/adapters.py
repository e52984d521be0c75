"""Several named adapters in one ``FastPeftModel``: peft's adapter lifecycle for LoRA and (IA)^3.

A model from ``fastpeft.get_peft_model`` starts with one adapter per layer (``LoRALinear`` /
``IA3Linear``, parameters ``<path>.lora_A.weight``); ``set_adapter``, ``disable_adapter``,
``merge_adapter`` ... work on those through ``SingleAdapterView``. The first ``add_adapter`` (or
``delete_adapter``) turns each of them into a
``LoRALinearAdapters`` / ``IA3LinearAdapters`` that holds adapters by name exactly as peft's layers do
(``<path>.lora_A.<adapter>.weight``, ``<path>.ia3_l.<adapter>``), keeping the same parameter
objects, so optimizers keep working and names, state_dicts and checkpoints match peft's.

The layers follow peft's ``LoraLayer`` / ``IA3Layer`` semantics: active adapters (several at once
add up (LoRA) or multiply (IA)^3), adapters absent from a layer are skipped, disabled adapters run
the base alone (unmerging first), merged adapters live in the base weight. The fused op runs the
first active adapter (all of them for (IA)^3); further active LoRA adapters are added in plain
PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpeft.integrations.targeting import target_module_names
from fastpeft.nn.base import base_layer_problem, frozen_base, is_bnb_linear4bit
from fastpeft.nn.ia3 import IA3Linear, fused_ia3_forward
from fastpeft.nn.lora import LoRALinear, fused_lora_forward


def _bnb_cpu_packed(base) -> bool:
    from fastpeft.integrations.patch import bnb_cpu_packed

    return bnb_cpu_packed(base)


class _MultiAdapterLayer(nn.Module):
    """What LoRALinearAdapters and IA3LinearAdapters share: the adapter bookkeeping of peft's BaseTunerLayer."""

    adapter_layer_names: tuple = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list = []
        self.disable_adapters = False
        self.merged_adapters: list = []

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def adapter_names(self) -> list:
        """Every adapter this layer holds, in the order they were added."""
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def adapter_parameters(self, name: str) -> list:
        """The parameters of adapter ``name`` on this layer (empty when it has none here)."""
        params = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return params

    def set_adapter(self, names: list, inference_mode: bool = False) -> None:
        """peft's ``set_adapter``: ``names`` become active and train (unless ``inference_mode``), the others freeze."""
        for adapter in self.adapter_names():
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(adapter in names and not inference_mode)
        self.active_adapters = list(names)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's ``enable_adapters``: disabling freezes every adapter; enabling re-activates the active ones."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self.disable_adapters = False
        else:
            for adapter in self.adapter_names():
                for p in self.adapter_parameters(adapter):
                    p.requires_grad_(False)
            self.disable_adapters = True

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from this layer (the model picks the new active adapter)."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self._forget(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _forget(self, name: str) -> None:
        pass

    def _adapters_to_run(self, table) -> list:
        """The active adapters of ``table`` this forward adds, as peft's forward decides: none when
        adapters are disabled (a merge is undone first) or merged (the base holds them)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        if self.merged:
            return []
        return [a for a in self.active_adapters if a in table]

    def merge(self, adapter_names: Optional[list] = None) -> None:
        """Fold the given adapters (default: the active ones) present here into a dense base weight."""
        if is_bnb_linear4bit(self.base_layer) or not self.base_layer.weight.dtype.is_floating_point:
            raise NotImplementedError(
                "merging needs a dense base layer: a quantized weight cannot hold the merged update exactly. "
                "Load the model dense to merge."
            )
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name in getattr(self, self.adapter_layer_names[0]) and name not in self.merged_adapters:
                with torch.no_grad():
                    self._merge_one(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._unmerge_one(name)


class LoRALinearAdapters(_MultiAdapterLayer):
    """LoRA adapters by name around one frozen ``nn.Linear`` / bitsandbytes 4-bit / int8 base, laid
    out as peft's ``lora.Linear``: ``lora_A.<adapter>`` / ``lora_B.<adapter>`` (``nn.Linear``),
    ``scaling[adapter]``, ``lora_dropout[adapter]``."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict = {}
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def add(self, name: str, layer: LoRALinear) -> None:
        """Take over ``layer``'s adapter (its lora_A / lora_B modules, the same objects) as ``name``."""
        self.lora_A[name] = layer.lora_A
        self.lora_B[name] = layer.lora_B
        self.lora_dropout[name] = nn.Dropout(layer.lora_dropout) if layer.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = layer.scaling

    def _forget(self, name):
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.scaling.pop(name, None)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` of adapter ``name`` in float32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def _merge_one(self, name):
        w = self.base_layer.weight
        w.copy_((w.float() + self.get_delta_weight(name)).to(w.dtype))

    def _unmerge_one(self, name):
        w = self.base_layer.weight
        w.copy_((w.float() - self.get_delta_weight(name)).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """peft's ``lora.Linear.forward``: the first active adapter fused with the base GEMM, the others added."""
        adapters = self._adapters_to_run(self.lora_A)
        if not adapters:
            return self.base_layer(x)
        if _bnb_cpu_packed(self.base_layer):  # peft's arithmetic on bitsandbytes' own path
            out = self.base_layer(x)
            for name in adapters:
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                delta = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]
                out = out + delta.to(out.dtype)
            return out
        first = adapters[0]
        dropout = self.lora_dropout[first]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        base = frozen_base(self.base_layer)  # FSDP1 hands the frozen base in as views that require grad
        kind = "dense" if base is not self.base_layer else None
        out = fused_lora_forward(base, self.lora_A[first].weight, self.lora_B[first].weight, self.scaling[first], p, x,
                                 kind)  # fmt: skip
        for name in adapters[1:]:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]
            out = out + delta.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapters}"


class IA3LinearAdapters(_MultiAdapterLayer):
    """(IA)^3 vectors by name around one frozen ``nn.Linear`` / bitsandbytes 4-bit base, laid out as
    peft's ``ia3.Linear``: ``ia3_l.<adapter>`` ((out, 1), or (1, in) for a feed-forward layer)."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = bool(is_feedforward)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def add(self, name: str, layer: IA3Linear) -> None:
        """Take over ``layer``'s vector (the same parameter) as ``name``."""
        self.ia3_l[name] = layer.ia3_l

    def _merge_one(self, name):
        w, b = self.base_layer.weight, self.base_layer.bias
        l = self.ia3_l[name].data
        w.data = torch.mul(w.data, l).to(w.dtype)
        if not self.is_feedforward and b is not None:
            b.data = torch.mul(b.data, l.reshape(b.shape)).to(b.dtype)

    def _unmerge_one(self, name):  # peft's formulas, including its 1e-8
        w, b = self.base_layer.weight, self.base_layer.bias
        l = self.ia3_l[name].data
        w.data = torch.div(w.data, l + 1e-8).to(w.dtype)
        if not self.is_feedforward and b is not None:
            b.data = torch.div(b.data, l.reshape(b.shape) + 1e-8).to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """peft's ``ia3.Linear.forward`` on the fused op: the active vectors multiplied."""
        adapters = self._adapters_to_run(self.ia3_l)
        if not adapters:
            return self.base_layer(x)
        vectors = self.ia3_l[adapters[0]]
        for name in adapters[1:]:
            vectors = vectors.flatten() * self.ia3_l[name].flatten()
        if _bnb_cpu_packed(self.base_layer):  # peft's arithmetic on bitsandbytes' own path
            vectors = vectors.flatten()
            if self.is_feedforward:
                return self.base_layer((x.to(vectors.dtype) * vectors).to(x.dtype))
            out = self.base_layer(x)
            return (out * vectors).to(out.dtype)
        base = frozen_base(self.base_layer)
        return fused_ia3_forward(base, vectors, self.is_feedforward, x, kind="dense" if base is not self.base_layer else None)

    def extra_repr(self) -> str:
        side = "feedforward (input)" if self.is_feedforward else "output"
        return f"{side}, adapters={self.adapter_names()}, active={self.active_adapters}"


_DISABLED = "_fastpeft_adapter_disabled"


class SingleAdapterView:
    """peft's per-layer lifecycle interface (the one the multi-adapter layers have) over a
    single-adapter ``LoRALinear`` / ``IA3Linear`` whose adapter is called ``name``, without changing
    the module (its parameter names stay ``lora_A.weight``). Disabling marks the layer merged, which
    makes its forward run the base alone; a layer merged for real is unmerged first, as peft's
    disabled forward does."""

    def __init__(self, layer: nn.Module, name: str, active: list):
        self.layer = layer
        self.name = name
        self.active = list(active)

    @property
    def base_layer(self) -> nn.Module:
        """The wrapped frozen layer."""
        return self.layer.base_layer

    @property
    def disabled(self) -> bool:
        """Whether adapters are disabled on this layer (it runs the base alone)."""
        return bool(self.layer.__dict__.get(_DISABLED, False))

    @property
    def merged_adapters(self) -> list:
        """``[name]`` while the adapter is merged into the base weight, else ``[]``."""
        return [self.name] if self.layer.merged and not self.disabled else []

    def adapter_parameters(self, name: str) -> list:
        """The adapter's parameters if ``name`` is this layer's adapter, else ``[]``."""
        if name != self.name:
            return []
        if isinstance(self.layer, LoRALinear):
            return [self.layer.lora_A.weight, self.layer.lora_B.weight]
        return [self.layer.ia3_l]

    def set_adapter(self, names: list, inference_mode: bool = False) -> None:
        """peft's ``set_adapter`` on this layer."""
        for p in self.adapter_parameters(self.name):
            p.requires_grad_(self.name in names and not inference_mode)
        self.active = list(names)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's ``enable_adapters`` on this layer."""
        state = self.layer.__dict__
        if enabled:
            if state.pop(_DISABLED, False):
                self.layer.merged = False
            self.set_adapter(self.active)
            return
        if not self.disabled:
            if self.layer.merged:
                self.layer.unmerge()
            self.layer.merged = True  # forward: the base layer alone
            state[_DISABLED] = True
        for p in self.adapter_parameters(self.name):
            p.requires_grad_(False)

    def merge(self, adapter_names: Optional[list] = None) -> None:
        """Fold the adapter into the dense base weight if it is among ``adapter_names`` (default: the
        active adapters); nothing while adapters are disabled."""
        names = self.active if adapter_names is None else adapter_names
        if self.name in names and not self.disabled:
            self.layer.merge()

    def unmerge(self) -> None:
        """Take the adapter out of the base weight again (nothing while adapters are disabled: the
        layer was unmerged when they were)."""
        if not self.disabled:
            self.layer.unmerge()


def single_views(model: nn.Module, peft_type: str, name: str, active: list) -> list:
    """A ``SingleAdapterView`` of every single-adapter layer of ``model``."""
    single = LoRALinear if peft_type == "LORA" else IA3Linear
    return [SingleAdapterView(m, name, active) for m in model.modules() if type(m) is single]


MULTI_TYPES = (LoRALinearAdapters, IA3LinearAdapters)
PREFIXES = {"LORA": "lora_", "IA3": "ia3_"}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def multi_layers(model: nn.Module) -> list:
    """(name, layer) of every multi-adapter layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MULTI_TYPES)]


def to_multi(model: nn.Module, peft_type: str, adapter_name: str) -> None:
    """Turn every single-adapter ``LoRALinear`` / ``IA3Linear`` of ``model`` into a multi-adapter
    layer holding it as ``adapter_name`` (active), in place; the parameter objects stay."""
    single = LoRALinear if peft_type == "LORA" else IA3Linear
    layers = [(n, m) for n, m in model.named_modules() if type(m) is single]
    dora = [n for n, m in layers if getattr(m, "use_dora", False)]
    if dora:
        raise NotImplementedError(f"a DoRA adapter runs alone on its layers; fastpeft does not add or delete adapters on "
                                  f"DoRA layers ({', '.join(dora[:3])}{' ...' if len(dora) > 3 else ''}); use peft for that")  # fmt: skip
    for name, layer in layers:
        if layer.__dict__.get(_DISABLED, False):
            raise ValueError("cannot add or delete adapters while adapters are disabled (inside disable_adapter())")
        if layer.merged:
            raise ValueError(f"{name} is merged; call unmerge_adapter() before adding or deleting adapters")
        if peft_type == "LORA":
            multi = LoRALinearAdapters(layer.base_layer)
        else:
            if layer.num_tasks is not None:
                raise NotImplementedError("IA3Linear layers with a task bank (num_tasks) do not take named adapters")
            multi = IA3LinearAdapters(layer.base_layer, layer.is_feedforward)
        multi.add(adapter_name, layer)
        multi.active_adapters = [adapter_name]
        multi.train(layer.training)
        _set(model, name, multi)


class _BaseView:
    """A context in which every multi-adapter layer of a model is replaced by its base layer, so peft's
    target matching sees the model as peft would (no adapter modules, no ``all-linear`` surprises)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = []

    def __enter__(self):
        self.layers = multi_layers(self.model)
        for name, layer in self.layers:
            _set(self.model, name, layer.base_layer)
        return self.model

    def __exit__(self, *exc):
        for name, layer in self.layers:
            _set(self.model, name, layer)
        return False


def add_adapter(model: nn.Module, peft_type: str, adapter_name: str, config) -> list:
    """Add adapter ``adapter_name`` (inactive, frozen, as peft's ``add_adapter`` leaves it) to the
    modules ``config`` targets; returns their names. Validates everything before changing anything."""
    if peft_type == "LORA":
        from fastpeft.integrations.lora import _pattern_value, check_supported
    else:
        from fastpeft.integrations.ia3 import apply_model_type_defaults, check_supported, is_feedforward
    check_supported(config, **({"own_inits_only": True} if peft_type == "LORA" else {}))
    if getattr(config, "modules_to_save", None):
        raise NotImplementedError("fastpeft's add_adapter does not take modules_to_save; train those modules with peft")
    with _BaseView(model):
        if peft_type == "IA3":
            apply_model_type_defaults(model, config)
        names = target_module_names(model, config)
    current = {n: model.get_submodule(n) for n in names}
    bases = {n: (m.base_layer if isinstance(m, MULTI_TYPES) else m) for n, m in current.items()}
    problems = {}
    for n, base in bases.items():
        problem = base_layer_problem(base)
        if problem is not None:
            problems[n] = problem
    if problems:
        raise NotImplementedError(
            f"fastpeft {peft_type} cannot adapt these targeted modules: "
            + ", ".join(f"{n} ({p})" for n, p in problems.items()) + ". Narrow target_modules, or use peft."
        )
    for n in names:
        module, base = current[n], bases[n]
        requires_grad = {id(p): p.requires_grad for p in base.parameters()}
        if peft_type == "LORA":
            r = _pattern_value(config.rank_pattern, n, config.r)
            alpha = _pattern_value(config.alpha_pattern, n, config.lora_alpha)
            single = LoRALinear(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)  # fmt: skip
            multi = module if isinstance(module, LoRALinearAdapters) else LoRALinearAdapters(base)
        else:
            # As in peft, a layer keeps the feed-forward side its first adapter gave it.
            feedforward = module.is_feedforward if isinstance(module, IA3LinearAdapters) else is_feedforward(config, n)
            single = IA3Linear(base, is_feedforward=feedforward, init_ia3_weights=config.init_ia3_weights)
            multi = module if isinstance(module, IA3LinearAdapters) else IA3LinearAdapters(base, feedforward)
        for p in base.parameters():  # the single layer froze them; the base stays as it was
            p.requires_grad_(requires_grad[id(p)])
        multi.add(adapter_name, single)
        for p in multi.adapter_parameters(adapter_name):
            p.requires_grad_(False)
        if multi is not module:
            multi.train(module.training)
            _set(model, n, multi)
    return names


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict:
    """Adapter ``adapter_name``'s tensors under peft's checkpoint names relative to ``model``
    (``<path>.lora_A.weight``, ``<path>.ia3_l``: the adapter name dropped, as peft saves), live."""
    out = {}
    for name, layer in multi_layers(model):
        if isinstance(layer, LoRALinearAdapters):
            if adapter_name in layer.lora_A:
                out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
                out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        elif adapter_name in layer.ia3_l:
            out[f"{name}.ia3_l"] = layer.ia3_l[adapter_name]
    return out


def unload(model: nn.Module, merge: bool, adapter_names: Optional[list] = None) -> nn.Module:
    """Put every multi-adapter layer's base layer back (merging the active adapters, or the given
    ones, first with ``merge``); returns ``model``. Merging validates every layer first."""
    layers = multi_layers(model)
    if merge:
        for _, layer in layers:
            if is_bnb_linear4bit(layer.base_layer) or not layer.base_layer.weight.dtype.is_floating_point:
                raise NotImplementedError(
                    "merge_and_unload needs dense base layers; a quantized base cannot hold the merged weight. "
                    "Nothing was merged. Use unload(), or load the model dense to merge."
                )
        for _, layer in layers:
            layer.merge(adapter_names)
    for name, layer in layers:
        _set(model, name, layer.base_layer)
    return model

