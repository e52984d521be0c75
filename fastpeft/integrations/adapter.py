"""Bottleneck adapters (Houlsby / Pfeiffer) through ``fastpeft.get_peft_model``; peft has no such method.

    config = BottleneckAdapterConfig(reduction_factor=16, placement="pfeiffer", task_type="SEQ_CLS")
    model = fastpeft.get_peft_model(model, config)
    loss = model(**batch).loss                                  # base frozen, adapters train
    out = model(**batch, adapter_index=torch.tensor([0, 2]))    # num_adapters > 1: one per example

Where the adapters go (the ``adapters`` library's SeqBnConfig = "pfeiffer", DoubleSeqBnConfig = "houlsby"):

* BERT-style post-norm encoders (``BertSelfOutput`` / ``BertOutput``: dense -> dropout -> LayerNorm(h + input)):
  "pfeiffer" puts one adapter in the FFN output, "houlsby" one in the attention output and one in
  the FFN output, both before the residual LayerNorm exactly as the adapters library does:
  pfeiffer (``original_ln_before=True``) runs ``h + f(LN(h + input))``, houlsby ``h + f(h)``, then
  ``LN(. + input)``.
* Llama / Qwen2 / Mistral-style pre-norm decoders: the adapter maps the sub-layer output
  ``h -> h + f(h)`` before the decoder layer's residual add (the MLP for "pfeiffer", self-attention
  and MLP for "houlsby"). The adapters library instead feeds ``h + residual`` to a pfeiffer adapter
  on these models; fastpeft keeps the residual stream out of the adapter input here.

``f(h) = scaling * up(act(down(LN?(h))))`` runs as one fused op (``fastpeft.nn.BottleneckAdapter``).
The adapters are attached as a ``bottleneck_adapter`` submodule of each adapted module, whose class
is swapped for a subclass that calls it, so base parameter names stay unchanged and adapter
parameters are saved as ``base_model.model.<module path>.bottleneck_adapter.<down_weight|...>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar, Optional

import torch
from torch import nn

from fastpeft.integrations.config_checks import check_reduction_factor, is_int
from fastpeft.integrations.registry import Injection, register_method
from fastpeft.nn.adapter import BottleneckAdapter

PEFT_TYPE = "FASTPEFT_BOTTLENECK"
PLACEMENTS = ("pfeiffer", "houlsby")
NON_LINEARITIES = ("relu", "gelu", "silu", "swish")
INIT_WEIGHTS = ("bert", "zero_up")
ADAPTER_ATTRIBUTE = "bottleneck_adapter"
_SLOT = "_fastpeft_adapter_slot"
_LN_BEFORE = "_fastpeft_original_ln_before"


@dataclasses.dataclass
class BottleneckAdapterConfig:
    """Bottleneck adapters for ``fastpeft.get_peft_model`` (see the module docstring for placement).

    ``bottleneck_size``: the adapter width r; None: ``hidden_size // reduction_factor`` (the adapters
    library's rule). ``non_linearity``: relu, gelu, silu or swish (= silu; the library's
    DoubleSeqBnConfig default). ``placement``: "pfeiffer" (SeqBnConfig: after the FFN) or "houlsby"
    (DoubleSeqBnConfig: after attention and after the FFN). ``scaling``: constant factor on the
    adapter branch. ``adapter_layer_norm``: a trainable layer norm on the adapter input (the
    library's ``ln_before``). ``init_weights``: "bert" (the library's default: weights N(0, 0.02),
    biases 0, so the model starts near its base) or "zero_up" (up projection zero: starts exactly
    at the base). ``num_adapters``: a bank of adapters per site; pass ``adapter_index`` [B] to the
    forward to pick each example's. ``modules_to_save`` / ``task_type`` as in peft (SEQ_CLS trains
    and saves the classifier head).
    """

    bottleneck_size: Optional[int] = None
    reduction_factor: float = 16
    non_linearity: str = "relu"
    placement: str = "pfeiffer"
    scaling: float = 1.0
    adapter_layer_norm: bool = False
    init_weights: str = "bert"
    modules_to_save: Optional[list] = None
    task_type: Optional[str] = None
    num_adapters: int = 1
    peft_type: str = PEFT_TYPE

    # What a subclass (AdaptableAdapterConfig) changes: its peft_type and the activations it takes.
    _PEFT_TYPE: ClassVar[str] = PEFT_TYPE
    _NON_LINEARITIES: ClassVar[tuple] = NON_LINEARITIES

    def __post_init__(self):
        if self.peft_type != self._PEFT_TYPE:
            raise ValueError(f"{type(self).__name__} has peft_type {self._PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.non_linearity not in self._NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {self._NON_LINEARITIES}, got {self.non_linearity!r}")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {self.init_weights!r}")
        if self.bottleneck_size is not None and (not is_int(self.bottleneck_size) or self.bottleneck_size < 1):
            raise ValueError(f"bottleneck_size must be an int >= 1 (or None), got {self.bottleneck_size!r}")
        check_reduction_factor(self.reduction_factor)
        if not is_int(self.num_adapters) or self.num_adapters < 1:
            raise ValueError(f"num_adapters must be an int >= 1, got {self.num_adapters!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a number, got {self.scaling!r}")
        if not isinstance(self.adapter_layer_norm, bool):
            raise ValueError(f"adapter_layer_norm must be a bool, got {self.adapter_layer_norm!r}")
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)

    def width(self, hidden_size: int) -> int:
        """The bottleneck width r for a model of ``hidden_size``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        r = int(hidden_size // self.reduction_factor)
        if r < 1:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} leaves no bottleneck for hidden size "
                             f"{hidden_size}; use a smaller reduction_factor or set bottleneck_size")  # fmt: skip
        return r

    def to_dict(self) -> dict:
        """The JSON-able fields (``peft_type`` included); ``BottleneckAdapterConfig(**to_dict())`` rebuilds it."""
        return dataclasses.asdict(self)

    def select_sites(self, sites: list) -> list:
        """The sites (``find_sites`` entries) that get an adapter: all of them."""
        return sites

    def adapter_kwargs(self) -> dict:
        """The ``BottleneckAdapter`` arguments this config sets (subclasses' adapters take them too)."""
        return dict(activation=self.non_linearity, ln_before=self.adapter_layer_norm, scaling=self.scaling,
                    num_adapters=self.num_adapters, init_weights=self.init_weights)  # fmt: skip

    def make_adapter(self, hidden: int, r: int, device, dtype) -> BottleneckAdapter:
        """The adapter module of one site."""
        return BottleneckAdapter(hidden, r, **self.adapter_kwargs(), device=device, dtype=dtype)


# ---- per-example index ----------------------------------------------------------------------------


class _IndexSlot:
    """The adapter index every adapted module of one model reads. A plain object shared by the
    modules (not a submodule). ``index`` is the latest forward's ``adapter_index``; it stays set after
    the call, so gradient-checkpoint recomputation during backward sees the index its forward used.
    ``default`` serves calls without one (set by ``adapter_index(model, index)``)."""

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.index: Optional[torch.Tensor] = None
        self.default: Optional[torch.Tensor] = None

    def ids_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.num_adapters == 1:
            return None
        index = self.index if self.index is not None else self.default
        if index is None:
            raise ValueError(f"this model has num_adapters={self.num_adapters}: pass adapter_index (a [batch] "
                             "tensor of adapter numbers) to its forward, or use fastpeft.integrations.adapter."
                             "adapter_index(model, index) for calls that cannot (generate)")  # fmt: skip
        index, batch = index.to(x.device), x.shape[0]
        if index.shape[0] != batch:
            if index.shape[0] and batch % index.shape[0] == 0:  # generate() with beams repeats each example
                return index.repeat_interleave(batch // index.shape[0])
            raise ValueError(f"adapter_index has {index.shape[0]} entries for a batch of {batch}")
        return index


def _check_index(index, num_adapters: int) -> Optional[torch.Tensor]:
    if index is None:
        return None
    if num_adapters == 1:
        raise ValueError("adapter_index needs a config with num_adapters > 1 (this model has one adapter per site)")
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"adapter_index must be a 1-D integer tensor [batch], got {index.dtype} {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_adapters):
        raise ValueError(f"adapter_index values must be in [0, {num_adapters}), got {index.tolist()}")
    return index


# ---- adapted module classes -----------------------------------------------------------------------


def _adapter_call(module: nn.Module, h: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    adapter = getattr(module, ADAPTER_ATTRIBUTE)
    return adapter(h, residual=residual, adapter_ids=getattr(module, _SLOT).ids_for(h))


def _post_norm_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput forward with the adapter before the residual LayerNorm."""
    h = self.dropout(self.dense(hidden_states))
    if getattr(self, _LN_BEFORE):  # SeqBn: the adapter reads LN(h + input) and adds onto h
        h = _adapter_call(self, self.LayerNorm(h + input_tensor), residual=h)
    else:  # DoubleSeqBn: h + f(h)
        h = _adapter_call(self, h)
    return self.LayerNorm(h + input_tensor)


def _sublayer_forward(self, *args, **kwargs):
    """A decoder sub-layer (MLP or self-attention) whose output h becomes h + f(h)."""
    out = super(type(self), self).forward(*args, **kwargs)
    if isinstance(out, tuple):  # attention: (output, weights)
        return (_adapter_call(self, out[0]), *out[1:])
    return _adapter_call(self, out)


@functools.lru_cache(maxsize=None)
def _adapted_class(base: type, kind: str) -> type:
    forward = _post_norm_output_forward if kind == "post_norm" else _sublayer_forward
    return type(f"{base.__name__}WithBottleneckAdapter", (base,), {"forward": forward, "_fastpeft_base_class": base,
                                                                   "__module__": __name__})  # fmt: skip


# ---- finding the sites ----------------------------------------------------------------------------


def _is_post_norm_output(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("dense", "dropout", "LayerNorm"))


def find_sites(model: nn.Module, placement: str) -> list:
    """[(name, module, kind, original_ln_before)] of the modules that get an adapter, in model order.

    Raises ValueError naming the model class when it has neither BERT-style layers (``attention.output``
    + ``intermediate`` + ``output``) nor decoder layers (``self_attn`` + ``mlp``).
    """
    houlsby = placement == "houlsby"
    sites = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        attention, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if isinstance(attention, nn.Module) and isinstance(mlp, nn.Module):  # pre-norm decoder layer
            if houlsby:
                sites.append((prefix + "self_attn", attention, "sublayer", False))
            sites.append((prefix + "mlp", mlp, "sublayer", False))
            continue
        attention_output = getattr(getattr(m, "attention", None), "output", None)
        output = getattr(m, "output", None)
        if isinstance(getattr(m, "intermediate", None), nn.Module) and attention_output is not None \
                and output is not None:  # fmt: skip
            pair = [(prefix + "attention.output", attention_output)] if houlsby else []
            for site_name, site in pair + [(prefix + "output", output)]:
                if not _is_post_norm_output(site):
                    raise NotImplementedError(f"{site_name} ({type(site).__name__}) is not a dense -> dropout -> "
                                              "LayerNorm(h + input) output block; fastpeft cannot place an adapter in it")  # fmt: skip
                sites.append((site_name, site, "post_norm", not houlsby))
    if not sites:
        raise ValueError(f"fastpeft bottleneck adapters support BERT-style encoders (BertLayer: attention.output, "
                         f"intermediate, output) and Llama/Qwen2/Mistral-style decoders (self_attn + mlp); "
                         f"{type(model).__name__} has neither")  # fmt: skip
    adapted = [f"{n} ({type(s).__name__})" for n, s, _, _ in sites if hasattr(s, ADAPTER_ATTRIBUTE)]
    if adapted:
        raise ValueError(f"these modules already hold a bottleneck adapter: {', '.join(adapted)}; unload() first")
    return sites


def _model_layout(model: nn.Module):
    """(hidden size, dtype, device) for new adapters: the input embeddings' (4-bit models keep them dense)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    weight = model.get_input_embeddings().weight
    return config.hidden_size, weight.dtype, weight.device


# ---- injection ------------------------------------------------------------------------------------


def inject_adapters(model: nn.Module, config: BottleneckAdapterConfig) -> list:
    """Attach a ``BottleneckAdapter`` to every site of ``model`` (in place); return the site names.

    Validates the config and finds every site before the model changes.
    """
    if not isinstance(config, BottleneckAdapterConfig):
        raise TypeError(f"expected a BottleneckAdapterConfig, got {type(config).__name__}")
    config.__post_init__()  # fields may have been changed after construction
    sites = config.select_sites(find_sites(model, config.placement))
    hidden, dtype, device = _model_layout(model)
    r = config.width(hidden)
    slot = _IndexSlot(config.num_adapters)
    adapters = [config.make_adapter(hidden, r, device, dtype) for _ in sites]
    for (_, module, kind, ln_before), adapter in zip(sites, adapters):
        module.add_module(ADAPTER_ATTRIBUTE, adapter)
        setattr(module, _SLOT, slot)
        setattr(module, _LN_BEFORE, ln_before)
        module.__class__ = _adapted_class(type(module), kind)
    # Also on the root, so the forward finds the slot of the model it runs (a deepcopy has its own).
    model.__dict__[_SLOT] = slot
    return [name for name, *_ in sites]


def _adapted_modules(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if hasattr(type(m), "_fastpeft_base_class")]


def remove_adapter(module: nn.Module) -> None:
    """Take the adapter out of one adapted module and restore its class."""
    delattr(module, ADAPTER_ATTRIBUTE)
    delattr(module, _SLOT)
    delattr(module, _LN_BEFORE)
    module.__class__ = type(module)._fastpeft_base_class


def unload_adapters(model: nn.Module) -> nn.Module:
    """Remove every bottleneck adapter and restore the original module classes; returns ``model``."""
    for _, module in _adapted_modules(model):
        remove_adapter(module)
    model.__dict__.pop(_SLOT, None)
    return model


def adapter_parameter_names(model: nn.Module) -> list:
    """Names (relative to ``model``) of every bottleneck-adapter parameter."""
    return [f"{name}.{ADAPTER_ATTRIBUTE}.{p}" for name, m in _adapted_modules(model)
            for p, _ in getattr(m, ADAPTER_ATTRIBUTE).named_parameters()]  # fmt: skip


def _slot_of(model: nn.Module) -> _IndexSlot:
    model = getattr(getattr(model, "base_model", None), "model", model)  # a FastPeftModel or the adapted model
    if _SLOT in model.__dict__:
        return model.__dict__[_SLOT]
    adapted = _adapted_modules(model)
    if not adapted:
        raise ValueError(f"{type(model).__name__} has no fastpeft bottleneck adapters")
    return getattr(adapted[0][1], _SLOT)


@contextlib.contextmanager
def adapter_index(model: nn.Module, index):
    """Within the block, forward calls that pass no ``adapter_index`` (``generate()``, which rejects
    unknown keywords) use ``index`` [B] (repeated per beam when the batch is a multiple of B)."""
    slot = _slot_of(model)
    previous = slot.index, slot.default
    slot.index, slot.default = None, _check_index(index, slot.num_adapters)
    try:
        yield
    finally:
        slot.index, slot.default = previous


def _merge_unsupported():
    raise NotImplementedError("bottleneck adapters cannot be merged into the base weights: f(h) = up(act(down(h))) "
                              "is nonlinear; use unload() to drop them, or keep the FastPeftModel")  # fmt: skip


def inject(model: nn.Module, config: BottleneckAdapterConfig) -> Injection:
    """The injector of bottleneck adapters (and of subclasses' configs: adaptable adapters)."""
    inject_adapters(model, config)

    def forward(inner: nn.Module, *args, adapter_index=None, **kwargs):
        slot = _slot_of(inner)
        # Kept set after the call: gradient checkpointing recomputes the layers during backward.
        slot.index = _check_index(adapter_index, slot.num_adapters)
        return inner(*args, **kwargs)

    return Injection(
        parameter_names=adapter_parameter_names(model),
        unload=lambda: unload_adapters(model),
        merge_and_unload=_merge_unsupported,
        forward=forward,
    )


register_method(PEFT_TYPE, inject, BottleneckAdapterConfig)
