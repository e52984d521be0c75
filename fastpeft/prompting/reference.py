"""Plain-PyTorch references: what cloze classification looks like written the straightforward way.

Full vocabulary logits at every position (``model(**inputs).logits`` for a ``*ForMaskedLM``; the
last hidden state times the whole word-embedding matrix for a bare encoder), then the mask
position's row and the label words' columns are gathered. Tests compare fastpeft's scoring to
these; the main job uses them as the peer it is timed against.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.prompting.mlm import split_masked_lm, unwrap
from fastpeft.prompting.verbalizer import Verbalizer


def full_vocab_logits_reference(model: nn.Module, **inputs) -> torch.Tensor:
    """[B, S, V] logits over the whole vocabulary at every position."""
    parts = split_masked_lm(model)
    if parts.has_mlm_head:
        return unwrap(model)(**inputs).logits
    return parts.body(**inputs).last_hidden_state @ parts.weight.T


def cloze_label_scores_reference(model: nn.Module, verbalizer: Verbalizer, mask_positions: torch.Tensor,
                                 **inputs) -> torch.Tensor:  # fmt: skip
    """[B, L] label scores the plain way: full logits, gather the mask row, gather the label words,
    aggregate each label's words with a Python loop (mean or logsumexp)."""
    logits = full_vocab_logits_reference(model, **inputs)
    at_mask = logits[torch.arange(logits.shape[0], device=logits.device), mask_positions.to(logits.device)]  # [B, V]
    columns = []
    for index in range(len(verbalizer)):
        ids = verbalizer.token_ids[verbalizer.word_label == index].to(logits.device)
        words = at_mask[:, ids]
        columns.append(words.mean(-1) if verbalizer.aggregate == "mean" else torch.logsumexp(words, -1))
    return torch.stack(columns, dim=-1)
