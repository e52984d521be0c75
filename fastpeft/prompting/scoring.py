"""PET / LM-BFF scoring: label scores at the mask position without the vocabulary-sized logits.

The plain practice runs the MLM head on every position (``[B, S, V]`` logits, V = 30522 for BERT)
and gathers the mask position's label-word columns. Here only the mask position's hidden state
goes through the head's transform, and only the W label words' rows of the decoder weight (and
bias) are used: ``[B, H] @ [H, W]``. On a bare encoder (no MLM head, e.g. all-MiniLM-L6-v2) the
mask position's last hidden state is scored against the tied word embeddings' rows of the label
words (a dot product, no bias). Either way the encoder may be frozen or adapted by any fastpeft
method that acts inside its modules (LoRA, (IA)^3, adapters, BitFit, FishMask, prefix tuning).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpeft.prompting.mlm import mask_hidden_states, split_masked_lm, transformed
from fastpeft.prompting.template import Template
from fastpeft.prompting.verbalizer import Verbalizer


def label_word_scores(model: nn.Module, token_ids: torch.Tensor, mask_positions: torch.Tensor, **inputs) -> torch.Tensor:
    """Scores [B, W] of the tokens ``token_ids`` [W] at each example's ``mask_positions`` [B]:
    ``transform(h_mask) @ weight[token_ids].T + bias[token_ids]`` (see the module docstring).
    ``inputs``: the encoder's inputs (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
    parts = split_masked_lm(model)
    hidden = transformed(parts, mask_hidden_states(parts, mask_positions, **inputs))
    ids = token_ids.to(parts.weight.device)
    rows = parts.weight[ids].to(hidden.dtype)
    scores = hidden @ rows.T
    if parts.bias is not None:
        scores = scores + parts.bias[ids].to(scores.dtype)
    return scores


def cloze_label_scores(model: nn.Module, verbalizer: Verbalizer, mask_positions: torch.Tensor, **inputs) -> torch.Tensor:
    """Per-label scores [B, L] at the mask position (the verbalizer's aggregate of its words)."""
    return verbalizer.label_scores(label_word_scores(model, verbalizer.token_ids, mask_positions, **inputs))


def cloze_loss(label_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PET's loss: cross-entropy of the label scores [B, L] against label indices [B] (mean)."""
    return nn.functional.cross_entropy(label_scores.float(), labels)


def cloze_predict(label_scores: torch.Tensor) -> torch.Tensor:
    """The predicted label index per example: argmax of the label scores [B, L] -> [B]."""
    return label_scores.argmax(-1)


class ClozeClassifier(nn.Module):
    """A masked LM (or bare encoder), a template and a verbalizer as one classifier.

    ``encode(texts, demonstrations=None)`` tokenizes through the template; ``forward(**encoded)``
    returns the label scores [B, L]; ``loss`` / ``predict`` are ``cloze_loss`` / ``cloze_predict``.
    The model is used as given (frozen, or adapted with ``fastpeft.get_peft_model``); its trainable
    parameters are the classifier's."""

    def __init__(self, model: nn.Module, tokenizer, template, verbalizer: Verbalizer):
        super().__init__()
        split_masked_lm(model)  # refuse unsupported models up front
        self.model, self.tokenizer = model, tokenizer
        self.template = template if isinstance(template, Template) else Template(template)
        self.verbalizer = verbalizer

    def encode(self, texts, demonstrations=None, max_length: Optional[int] = None, device=None) -> dict:
        """``Template.encode`` with this classifier's tokenizer, moved to ``device``."""
        enc = self.template.encode(self.tokenizer, texts, demonstrations, max_length=max_length)
        return {k: v.to(device) for k, v in enc.items()} if device is not None else enc

    def forward(self, input_ids=None, attention_mask=None, mask_positions=None, token_type_ids=None) -> torch.Tensor:
        """Label scores [B, L] at the mask positions."""
        if mask_positions is None:
            raise ValueError("mask_positions is required (Template.encode returns it)")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return cloze_label_scores(self.model, self.verbalizer, mask_positions, **inputs)

    def loss(self, label_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cloze_loss``."""
        return cloze_loss(label_scores, labels)

    def predict(self, label_scores: torch.Tensor) -> torch.Tensor:
        """``cloze_predict``."""
        return cloze_predict(label_scores)
