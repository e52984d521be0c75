"""Where a masked-LM's pieces are: the encoder body, the MLM head's transform and the output rows.

Cloze scoring (PET / LM-BFF, WARP) needs the hidden state at one position and a few rows of the
output layer, never the ``[B, S, V]`` logits. ``split_masked_lm`` finds, for

* a BERT-family ``*ForMaskedLM`` (``cls.predictions``: transform = dense + activation + LayerNorm,
  then the decoder, tied to the word embeddings): the body (``model.bert``), the transform, the
  decoder weight and its bias;
* a bare encoder (``BertModel``, e.g. the shipped all-MiniLM-L6-v2, which has no MLM head): the
  model itself, no transform, the word embeddings' weight (scores are dot products with the tied
  input embeddings) and no bias.

A model adapted with ``fastpeft.get_peft_model`` or peft (``get_base_model()``) is unwrapped first;
its adapters live inside the modules (LoRA, (IA)^3, adapters, BitFit, FishMask, prefix tuning), so
calling the body runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class MaskedLMParts:
    """``body(input_ids=..., attention_mask=...)`` -> ``last_hidden_state`` [B, S, H];
    ``transform``: the MLM head's transform (None: identity); ``weight`` [V, H] and ``bias`` [V]
    (or None): the output layer whose rows score the vocabulary."""

    body: nn.Module
    transform: Optional[nn.Module]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    @property
    def has_mlm_head(self) -> bool:
        """True for a ``*ForMaskedLM`` head, False for a bare encoder scored by its word embeddings."""
        return self.transform is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a fastpeft ``FastPeftModel`` or a peft ``PeftModel``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_masked_lm(model: nn.Module) -> MaskedLMParts:
    """The body, transform and output rows of ``model`` (see the module docstring). Raises
    ValueError naming the model class when it is neither a BERT-style MLM nor a bare encoder."""
    base = unwrap(model)
    predictions = getattr(getattr(base, "cls", None), "predictions", None)
    if predictions is not None and hasattr(predictions, "transform") and hasattr(predictions, "decoder"):
        body = getattr(base, base.base_model_prefix)
        return MaskedLMParts(body, predictions.transform, predictions.decoder.weight, predictions.decoder.bias)
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if output is None and isinstance(embeddings, nn.Embedding):
        return MaskedLMParts(base, None, embeddings.weight, None)
    raise ValueError(
        f"{type(base).__name__} is neither a BERT-style masked LM (cls.predictions.transform + decoder) nor a bare "
        "encoder with word embeddings; cloze scoring supports BertForMaskedLM-like models and BertModel-like bodies"
    )


def mask_hidden_states(parts: MaskedLMParts, mask_positions: torch.Tensor, **inputs) -> torch.Tensor:
    """The body's last hidden state at each example's mask position: [B, H]. ``inputs`` go to the
    body (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``token_type_ids``)."""
    hidden = parts.body(**inputs).last_hidden_state
    if mask_positions.shape != hidden.shape[:1]:
        raise ValueError(f"mask_positions must have shape [B={hidden.shape[0]}], got {tuple(mask_positions.shape)}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, mask_positions.to(hidden.device)]


def transformed(parts: MaskedLMParts, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` through the MLM head's transform (identity for a bare encoder)."""
    return hidden if parts.transform is None else parts.transform(hidden)
