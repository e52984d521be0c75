"""MAD-X invertible adapters through ``fastpeft.get_peft_model`` (Pfeiffer et al. 2020).

    config = InvertibleAdapterConfig(kind="nice", reduction_factor=2,                 # the invertible adapter
                                     bottleneck_adapter=BottleneckAdapterConfig(reduction_factor=2))  # + language adapters
    model = fastpeft.get_peft_model(bert_for_masked_lm, config)
    loss = model(**batch, labels=labels).loss                 # MLM training of a language adapter
    model.save_pretrained("lang_adapter/");  model = fastpeft.from_pretrained(fresh_model, "lang_adapter/")

Where it goes:

* ``forward`` of a ``fastpeft.nn.InvertibleAdapter`` on the embedding output: a forward hook on the
  model's embeddings block (``model.base_model.embeddings``: word + position + type embeddings, layer
  norm, dropout, as the adapters library does for BERT) or, for models without one (Llama), on
  ``get_input_embeddings()``. Calls that pass ``inputs_embeds`` to a model without an embeddings
  block (Llama) skip the adapter.
* ``inverse`` on the LM head input: a forward pre-hook on the model's top-level head module that
  holds ``get_output_embeddings()`` (``cls`` of ``BertForMaskedLM``, ``lm_head`` of causal LMs), so
  the tied output embeddings see hidden states in the original embedding space.
  ``inverse_at_head=None`` (default) installs it when the model has output embeddings; models
  without an LM head (``*ForSequenceClassification``) get only the embedding-side adapter, as the
  adapters library's classification heads do (MAD-X uses the inverse only for MLM training).
* ``bottleneck_adapter`` (a ``BottleneckAdapterConfig`` or its ``to_dict()``): the language
  adapters in every layer, placed by the bottleneck-adapter injector
  (``fastpeft.integrations.adapter``, called through the method registry, unchanged), so the
  result is MAD-X's invertible + language adapter in one ``FastPeftModel``. Its ``num_adapters``
  must equal this config's: one ``adapter_index`` [B] picks each example's language for both.
  ``modules_to_save`` / ``task_type`` belong to this (outer) config.

The adapter is registered as the submodule ``invertible_adapter`` of the transformers model, so
checkpoints hold ``base_model.model.invertible_adapter.{f,g}_{down,up}_{weight,bias}`` (banks,
``num_adapters`` first) next to the bottleneck adapters' tensors. ``unload()`` removes the hooks and
the submodule (the forward is then exactly the base model's); ``merge_and_unload()`` raises: the
coupling is nonlinear.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from fastpeft.integrations.config_checks import check_reduction_factor, is_int
from fastpeft.integrations.registry import INJECTORS, Injection, register_method
from fastpeft.nn.invertible_adapter import ACTIVATIONS, KINDS, InvertibleAdapter, check_adapter_ids

PEFT_TYPE = "FASTPEFT_INVERTIBLE_ADAPTER"
ADAPTER_ATTRIBUTE = "invertible_adapter"
_HANDLES = "_fastpeft_invertible_handles"
_SLOT = "_fastpeft_invertible_slot"


@dataclasses.dataclass
class InvertibleAdapterConfig:
    """MAD-X invertible adapter (and, with ``bottleneck_adapter``, language adapters) for
    ``fastpeft.get_peft_model``; see the module docstring for placement.

    ``kind``: "nice" (additive coupling, the adapters library's default) or "glow" (affine, scale
    soft-clamped by ``clamp``). ``reduction_factor``: MLP width ``(hidden / 2) // reduction_factor``
    (library default 2). ``non_linearity``: relu, gelu, silu, swish or tanh. ``num_adapters``: a
    bank (one per language), picked per example by ``adapter_index`` [B] in the forward.
    ``inverse_at_head``: True / False / None (= where the model has output embeddings).
    ``bottleneck_adapter``: None, or a ``BottleneckAdapterConfig`` / its dict for MAD-X's language
    adapters. ``modules_to_save`` / ``task_type`` as in peft (SEQ_CLS trains and saves the classifier).
    """

    kind: str = "nice"
    reduction_factor: float = 2
    non_linearity: str = "relu"
    clamp: float = 5.0
    num_adapters: int = 1
    inverse_at_head: Optional[bool] = None
    bottleneck_adapter: Optional[dict] = None
    modules_to_save: Optional[list] = None
    task_type: Optional[str] = None
    peft_type: str = PEFT_TYPE

    def __post_init__(self):
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"InvertibleAdapterConfig has peft_type {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        check_reduction_factor(self.reduction_factor)
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {tuple(ACTIVATIONS)}, got {self.non_linearity!r}")
        if isinstance(self.clamp, bool) or not isinstance(self.clamp, (int, float)) or not self.clamp > 0:
            raise ValueError(f"clamp must be a number > 0, got {self.clamp!r}")
        if not is_int(self.num_adapters) or self.num_adapters < 1:
            raise ValueError(f"num_adapters must be an int >= 1, got {self.num_adapters!r}")
        if self.inverse_at_head not in (None, True, False):
            raise ValueError(f"inverse_at_head must be True, False or None, got {self.inverse_at_head!r}")
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.bottleneck_adapter is not None:
            bottleneck = self.bottleneck_config()  # validates its fields
            if bottleneck.num_adapters != self.num_adapters:
                raise ValueError(f"bottleneck_adapter.num_adapters ({bottleneck.num_adapters}) must equal num_adapters "
                                 f"({self.num_adapters}): one adapter_index picks each example's language for both")  # fmt: skip
            if bottleneck.modules_to_save or bottleneck.task_type:
                raise ValueError("set modules_to_save / task_type on the InvertibleAdapterConfig, not on its "
                                 "bottleneck_adapter")  # fmt: skip
            self.bottleneck_adapter = {k: v for k, v in bottleneck.to_dict().items() if k != "peft_type"}

    def bottleneck_config(self):
        """The language adapters' ``BottleneckAdapterConfig`` (None without ``bottleneck_adapter``)."""
        from fastpeft.integrations.adapter import BottleneckAdapterConfig

        b = self.bottleneck_adapter
        if b is None or isinstance(b, BottleneckAdapterConfig):
            return b
        if not isinstance(b, dict):
            raise ValueError(f"bottleneck_adapter must be a BottleneckAdapterConfig, a dict of its fields or None, "
                             f"got {type(b).__name__}")  # fmt: skip
        try:
            return BottleneckAdapterConfig(**b)
        except TypeError as exc:
            raise ValueError(f"bottleneck_adapter: {exc}") from exc

    def to_dict(self) -> dict:
        """The JSON-able fields (``peft_type`` included); ``InvertibleAdapterConfig(**to_dict())`` rebuilds it."""
        return dataclasses.asdict(self)


# ---- finding the sites --------------------------------------------------------------------------------


def embedding_site(model: nn.Module) -> nn.Module:
    """The module whose output the invertible adapter maps: the embeddings block of the model's
    body (``model.base_model.embeddings``) when there is one, else ``get_input_embeddings()``."""
    body = getattr(model, "base_model", model)
    embeddings = getattr(body, "embeddings", None)
    if isinstance(embeddings, nn.Module):
        return embeddings
    get = getattr(model, "get_input_embeddings", None)
    site = get() if get is not None else None
    if not isinstance(site, nn.Module):
        raise ValueError(f"{type(model).__name__} has neither an embeddings block nor get_input_embeddings(); "
                         "the invertible adapter has nowhere to go")  # fmt: skip
    return site


def head_site(model: nn.Module) -> Optional[nn.Module]:
    """The top-level child of ``model`` holding ``get_output_embeddings()`` (the MLM / LM head whose
    input gets the inverse), or None when the model has no output embeddings."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is None:
        return None
    body = getattr(model, "base_model", None)
    for _, child in model.named_children():
        if child is not body and any(m is out for m in child.modules()):
            return child
    raise ValueError(f"{type(model).__name__}'s output embeddings are not inside a head module next to its body; "
                     "pass inverse_at_head=False")  # fmt: skip


# ---- per-example index --------------------------------------------------------------------------------


class _IndexSlot:
    """The bank index both hooks read: the latest forward's ``adapter_index`` (kept after the call, so a
    gradient-checkpoint recomputation sees it). A plain object, not a submodule."""

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.index: Optional[torch.Tensor] = None

    def ids_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.num_adapters == 1 or self.index is None:
            return None if self.num_adapters == 1 else self._missing()
        index = self.index
        if index.shape[0] != x.shape[0] and index.shape[0] and x.shape[0] % index.shape[0] == 0:
            index = index.repeat_interleave(x.shape[0] // index.shape[0])  # generate() beams
        return index

    def _missing(self):
        raise ValueError(f"this model has an invertible-adapter bank of num_adapters={self.num_adapters}: pass "
                         "adapter_index (a [batch] tensor) to its forward")  # fmt: skip


# ---- install / remove ---------------------------------------------------------------------------------


def install_invertible_adapter(model: nn.Module, adapter: InvertibleAdapter, inverse_at_head: Optional[bool] = None):
    """Register ``adapter`` as ``model.invertible_adapter`` and hook it in: ``adapter.forward`` on the
    embedding output, ``adapter.inverse`` on the LM head input (``inverse_at_head``: True, False or
    None = when the model has output embeddings). Returns the names of the two sites (head: None).
    Everything is checked before the model changes; ``remove_invertible_adapter`` undoes it."""
    if not isinstance(adapter, InvertibleAdapter):
        raise TypeError(f"expected an InvertibleAdapter, got {type(adapter).__name__}")
    if hasattr(model, _HANDLES) or isinstance(getattr(model, ADAPTER_ATTRIBUTE, None), nn.Module):
        raise ValueError(f"{type(model).__name__} already has an invertible adapter; remove it first")
    embeddings = embedding_site(model)
    head = head_site(model) if inverse_at_head is not False else None
    if inverse_at_head is True and head is None:
        raise ValueError(f"inverse_at_head=True but {type(model).__name__} has no output embeddings (LM head)")
    names = {id(m): n for n, m in model.named_modules()}
    slot = _IndexSlot(adapter.num_adapters)

    def on_embeddings(module, args, output):
        if isinstance(output, torch.Tensor):
            return adapter(output, slot.ids_for(output))
        return (adapter(output[0], slot.ids_for(output[0])), *output[1:])

    def on_head(module, args, kwargs):
        if args:
            return (adapter.inverse(args[0], slot.ids_for(args[0])), *args[1:]), kwargs
        key = next(iter(kwargs))  # the head's first argument, passed by name
        return args, {**kwargs, key: adapter.inverse(kwargs[key], slot.ids_for(kwargs[key]))}

    model.add_module(ADAPTER_ATTRIBUTE, adapter)
    handles = [embeddings.register_forward_hook(on_embeddings)]
    if head is not None:
        handles.append(head.register_forward_pre_hook(on_head, with_kwargs=True))
    model.__dict__[_HANDLES] = handles
    model.__dict__[_SLOT] = slot
    return names[id(embeddings)], None if head is None else names[id(head)]


def remove_invertible_adapter(model: nn.Module) -> nn.Module:
    """Remove the hooks and the ``invertible_adapter`` submodule; returns ``model`` (its forward is the
    base model's again)."""
    for handle in model.__dict__.pop(_HANDLES, []):
        handle.remove()
    model.__dict__.pop(_SLOT, None)
    if ADAPTER_ATTRIBUTE in model._modules:
        delattr(model, ADAPTER_ATTRIBUTE)
    return model


def set_adapter_index(model: nn.Module, index) -> None:
    """Set the bank index the invertible adapter uses from now on ([B] tensor, or None for a bank of one)."""
    slot = model.__dict__.get(_SLOT)
    if slot is None:
        raise ValueError(f"{type(model).__name__} has no fastpeft invertible adapter")
    if index is not None:
        if slot.num_adapters == 1:
            raise ValueError("adapter_index needs num_adapters > 1 (this model has one invertible adapter)")
        index = torch.as_tensor(index)
        check_adapter_ids(index, slot.num_adapters, index.shape[0] if index.dim() == 1 else -1, index.device)
    slot.index = index


# ---- injection ----------------------------------------------------------------------------------------


def _merge_unsupported():
    raise NotImplementedError("invertible adapters cannot be merged into the base weights (the coupling is "
                              "nonlinear); use unload() to drop them, or keep the FastPeftModel")  # fmt: skip


def _inject(model: nn.Module, config: InvertibleAdapterConfig) -> Injection:
    config.__post_init__()
    embeddings = embedding_site(model)
    if config.inverse_at_head is not False:
        head_site(model)
    bottleneck = config.bottleneck_config()
    config_ = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    weight = next((p for p in embeddings.parameters()), None)
    adapter = InvertibleAdapter(config_.hidden_size, config.reduction_factor, config.kind, config.num_adapters,
                                config.non_linearity, config.clamp,
                                device=None if weight is None else weight.device,
                                dtype=None if weight is None or not weight.is_floating_point() else weight.dtype)  # fmt: skip
    inner = INJECTORS["FASTPEFT_BOTTLENECK"](model, bottleneck) if bottleneck is not None else None
    try:
        install_invertible_adapter(model, adapter, config.inverse_at_head)
    except Exception:
        if inner is not None:
            inner.unload()
        raise
    for p in adapter.parameters():
        p.requires_grad_(True)
    names = [f"{ADAPTER_ATTRIBUTE}.{n}" for n, _ in adapter.named_parameters()]

    def forward(model_: nn.Module, *args, adapter_index=None, **kwargs):
        set_adapter_index(model_, adapter_index)
        if inner is not None:
            return inner.forward(model_, *args, adapter_index=adapter_index, **kwargs)
        return model_(*args, **kwargs)

    def unload():
        remove_invertible_adapter(model)
        return inner.unload() if inner is not None else model

    return Injection(
        parameter_names=(list(inner.parameter_names) if inner is not None else []) + names,
        unload=unload,
        merge_and_unload=_merge_unsupported,
        forward=forward,
    )


register_method(PEFT_TYPE, _inject, InvertibleAdapterConfig)
