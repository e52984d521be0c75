"""Prefix tuning in HF transformers models through the attention-function interface.

peft implements prefix tuning by building a batch-repeated ``past_key_values`` cache holding the
prefix and concatenating it in front of every layer's keys; that breaks with new cache classes,
GQA and SDPA masks, and is dropped under gradient checkpointing (HF clears ``past_key_values``
inside checkpointed layers). Here the prefix never enters the cache: ``apply_prefix_tuning``
registers an attention function ("fastpeft_prefix") in ``AttentionInterface`` that runs
``fastpeft.ops.prefix_attention`` with the layer's prefix from a ``PrefixEncoder``:

    encoder = PrefixEncoder.for_model(model.config, num_virtual_tokens=16)
    with apply_prefix_tuning(model, encoder) as patch:
        loss = model(input_ids, attention_mask=mask, labels=labels).loss      # set 0 of the bank
        out = model(input_ids, prefix_index=torch.tensor([0, 3]))            # one set per example
        tokens = patch.generate(input_ids, prefix_index=idx, max_new_tokens=8)

What it changes, all undone by ``remove()`` (or leaving the ``with`` block):
  * the model's attention implementation (eager or sdpa before) becomes "fastpeft_prefix", whose
    masks are SDPA's boolean masks;
  * each attention module gets a reference to the encoder, which is also registered as the
    submodule ``fastpeft_prefix_encoder`` (so ``.to()``, ``parameters()`` and optimizers see it);
  * rotary position ids are shifted by ``position_offset`` (default P): the sequence starts after
    the prefix, as with peft's cache-based prefix, so the same weights give the same logits.

Works for Llama-, Qwen2- and Mistral-style models (GQA included) and for BERT-style encoders
(their absolute position ids are shifted by ``position_offset`` through the embeddings'
``past_key_values_length``), with gradient checkpointing and with ``generate()``: each decoding
step attends to the cached sequence plus the prefix, which is read from the encoder, never copied
into the cache. With attention dropout in training, layers fall back to concat + SDPA (peft's math).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from fastpeft.nn.prefix import PrefixEncoder
from fastpeft.ops.prefix_attention import prefix_attention

ATTENTION_NAME = "fastpeft_prefix"
ENCODER_ATTRIBUTE = "fastpeft_prefix_encoder"


class _PrefixSlot:
    """What an attention module knows about its prefix. A plain object, so the encoder is not
    registered as a submodule of every layer. ``default_index`` serves calls that cannot pass
    ``prefix_index`` themselves (``generate()`` rejects unknown model keywords)."""

    def __init__(self, encoder: PrefixEncoder):
        self.encoder = encoder
        self.default_index: Optional[torch.Tensor] = None


def _index_for_batch(index: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if index is None or index.shape[0] == batch:
        return index
    if index.dim() == 1 and index.shape[0] and batch % index.shape[0] == 0:
        # generate() with beams / several sequences per prompt repeats each example in place.
        return index.repeat_interleave(batch // index.shape[0])
    raise ValueError(f"prefix_index has {index.shape[0]} entries for a batch of {batch}")


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    prefix_index: Optional[torch.Tensor] = None,
    **kwargs,
):
    """An ``AttentionInterface`` function: query [B, H, Sq, D], key/value [B, Hkv, Skv, D] (the
    cache included), ``attention_mask`` None or HF's 4D mask; returns ([B, Sq, H, D], None).
    ``prefix_index`` [B] (a model-forward keyword, passed through by HF) picks each example's
    prefix set. Modules without a prefix run HF's SDPA attention."""
    slot = getattr(module, "_fastpeft_prefix", None)
    if slot is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    prefix_k, prefix_v = slot.encoder.layer(module.layer_idx)
    index = _index_for_batch(prefix_index if prefix_index is not None else slot.default_index, query.shape[0])
    # HF's mask already holds causality (aligned to the cache, as the op aligns it); without one,
    # the op applies the module's own causality.
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if dropout:
        return _concatenated_attention(module, query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype),
                                       index, attention_mask, causal, dropout, scaling, **kwargs)  # fmt: skip
    out = prefix_attention(query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype), index,
                           attention_mask, causal, scaling)  # fmt: skip
    return out.transpose(1, 2), None  # on CUDA stored as [B, S, H, D]: no copy (the CPU's HF path copies, as with SDPA)


def _concatenated_attention(module, query, key, value, prefix_k, prefix_v, index, attention_mask, causal, dropout,
                            scaling, **kwargs):  # fmt: skip
    """Attention dropout (BERT's attention_probs_dropout_prob, in training): the op has none, so run
    what peft's cached prefix runs: each example's prefix concatenated in front of its keys and
    values, HF's SDPA attention with dropout over all P + S keys (the prefix columns always visible)."""
    B, Sq, Skv = query.shape[0], query.shape[2], key.shape[2]
    if index is None:  # one shared set: expand (its backward is a sum over the batch; a gather's is an
        # accumulating index_put, ~0.3 ms a layer on the CPU, 2% of the MiniLM main job's step)
        prefix_k, prefix_v = (t[:1].expand(B, *t.shape[1:]) for t in (prefix_k, prefix_v))
    else:
        index = index.to(query.device).long()
        prefix_k, prefix_v = prefix_k[index], prefix_v[index]
    keys = torch.cat([prefix_k, key], dim=2)
    values = torch.cat([prefix_v, value], dim=2)
    if attention_mask is None and causal:  # aligned to the last key, as the op aligns it
        keys_at, queries_at = torch.arange(Skv, device=query.device), torch.arange(Sq, device=query.device)
        attention_mask = (keys_at[None, :] <= queries_at[:, None] + Skv - Sq)[None, None]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :].bool()
        shape = (*attention_mask.shape[:-1], prefix_k.shape[2])
        visible = torch.ones(shape, dtype=torch.bool, device=query.device) if attention_mask.dtype == torch.bool else \
            torch.zeros(shape, dtype=attention_mask.dtype, device=query.device)  # fmt: skip
        attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)  # fmt: skip


def register() -> None:
    """Register "fastpeft_prefix" in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _attention_modules(model: nn.Module):
    # Llama/Qwen2/Mistral-style attention (GQA: num_key_value_groups) and BERT-style self-attention
    # (attention_head_size); cross-attention keys come from another sequence and get no prefix.
    return [
        m for m in model.modules()
        if hasattr(m, "layer_idx") and (hasattr(m, "num_key_value_groups") or hasattr(m, "attention_head_size"))
        and "Cross" not in type(m).__name__
    ]  # fmt: skip


def _rotary_modules(model: nn.Module):
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def _absolute_position_modules(model: nn.Module):
    """BERT-style embeddings: absolute positions from ``past_key_values_length`` or ``position_ids``."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "position_embeddings", None), nn.Embedding)
        and "past_key_values_length" in inspect.signature(m.forward).parameters
    ]  # fmt: skip


def check_supported_model(model: nn.Module) -> None:
    """Raise NotImplementedError unless ``apply_prefix_tuning`` can patch ``model``: HF attention
    modules with ``layer_idx`` (Llama/Qwen2/Mistral-style or BERT-style), rotary or BERT-style
    absolute positions, no encoder-decoder."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"fastpeft prefix tuning does not support encoder-decoder models ({name})")
    if not _attention_modules(model):
        raise NotImplementedError(f"fastpeft prefix tuning found no supported attention modules (with layer_idx) "
                                  f"in {name}; it supports Llama/Qwen2/Mistral-style and BERT-style attention")  # fmt: skip
    if not _rotary_modules(model) and not _absolute_position_modules(model):
        raise NotImplementedError(f"fastpeft prefix tuning cannot shift the positions of {name}: it needs rotary "
                                  "embeddings or BERT-style absolute position embeddings")  # fmt: skip


def _check_encoder_fits(model: nn.Module, encoder: PrefixEncoder) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    got = (encoder.num_layers, encoder.num_kv_heads, encoder.head_dim)
    want = PrefixEncoder.layout_of(config)
    if got != want:
        raise ValueError(f"the PrefixEncoder has (layers, kv heads, head dim) = {got} but the model needs {want}; "
                         "build it with PrefixEncoder.for_model(model.config, ...)")  # fmt: skip


class PrefixTuningPatch:
    """A reversible patch of an HF model (see the module docstring); use ``remove()`` or ``with``."""

    def __init__(self, model: nn.Module, encoder: PrefixEncoder, position_offset: Optional[int] = None):
        if hasattr(model, ENCODER_ATTRIBUTE):
            raise ValueError("this model already has a fastpeft prefix; remove() that patch first")
        _check_encoder_fits(model, encoder)
        attention = _attention_modules(model)
        if not attention:
            raise ValueError(f"no attention modules with layer_idx found in {type(model).__name__}")
        register()
        self.model = model
        self.attention = attention
        self.original_implementation = model.config._attn_implementation
        self.position_offset = encoder.num_virtual_tokens if position_offset is None else int(position_offset)
        model.set_attn_implementation(ATTENTION_NAME)
        model.add_module(ENCODER_ATTRIBUTE, encoder)
        slot = _PrefixSlot(encoder)
        for m in attention:
            m._fastpeft_prefix = slot
        self.hooks = [m.register_forward_pre_hook(self._shift_positions, with_kwargs=True) for m in _rotary_modules(model)]
        self.hooks += [m.register_forward_pre_hook(self._shift_absolute_positions, with_kwargs=True)
                       for m in _absolute_position_modules(model)]  # fmt: skip

    @contextlib.contextmanager
    def prefix_index(self, index: Optional[torch.Tensor]):
        """Within the block, calls that pass no ``prefix_index`` use ``index``."""
        slot = self.attention[0]._fastpeft_prefix
        previous, slot.default_index = slot.default_index, index
        try:
            yield
        finally:
            slot.default_index = previous

    def generate(self, *args, prefix_index: Optional[torch.Tensor] = None, **kwargs):
        """``model.generate(...)`` with one prefix set per prompt (HF's generate() rejects extra
        model keywords, so the index travels through the patch)."""
        with self.prefix_index(prefix_index):
            return self.model.generate(*args, **kwargs)

    def _shift_positions(self, module, args, kwargs):
        if self.position_offset == 0:
            return None
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + self.position_offset}
        elif len(args) >= 2:
            args = (args[0], args[1] + self.position_offset, *args[2:])
        return args, kwargs

    def _shift_absolute_positions(self, module, args, kwargs):
        # BERT-style embeddings read positions past_key_values_length.. (peft's cached prefix makes that P).
        if self.position_offset == 0:
            return None
        if kwargs.get("position_ids") is not None:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + self.position_offset}
        offset = kwargs.get("past_key_values_length", 0) + self.position_offset
        return args, {**kwargs, "past_key_values_length": offset}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for m in self.attention:
            if hasattr(m, "_fastpeft_prefix"):
                del m._fastpeft_prefix
        if hasattr(self.model, ENCODER_ATTRIBUTE):
            delattr(self.model, ENCODER_ATTRIBUTE)
        self.model.set_attn_implementation(self.original_implementation)

    def __enter__(self) -> "PrefixTuningPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_prefix_tuning(model: nn.Module, encoder: PrefixEncoder, position_offset: Optional[int] = None) -> PrefixTuningPatch:
    """Run ``model``'s attention through fastpeft prefix attention with ``encoder``'s prefixes.

    ``position_offset``: added to the rotary position ids (default: the prefix length P, as with
    peft's cache-based prefix; 0 keeps positions from 0). Returns the patch; ``remove()`` undoes it.
    """
    return PrefixTuningPatch(model, encoder, position_offset)
