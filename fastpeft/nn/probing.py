"""Probing heads: a linear or shallow MLP classifier on pooled features of a frozen encoder."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

HEADS = ("linear", "mlp")
POOLINGS = ("cls", "mean")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def pool(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """[B, T, d] -> [B, d]: the first token ("cls", BERT's [CLS]) or the mean over the tokens the
    attention mask keeps ("mean"; every token when ``attention_mask`` is None). A row whose mask is
    all zeros pools to zeros."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [batch, tokens, hidden], got {tuple(hidden_states.shape)}")
    if pooling == "cls":
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask must be [batch, tokens] = {tuple(hidden_states.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")  # fmt: skip
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class ProbingHead(nn.Module):
    """The trained part of a probe: ``dropout -> Linear(in, num_labels)`` ("linear"), or
    ``Linear(in, hidden) -> act -> dropout -> Linear(hidden, num_labels)`` ("mlp"; ``hidden``
    defaults to ``in_features``). ``forward(features [B, in]) -> logits [B, num_labels]``."""

    def __init__(self, in_features: int, num_labels: int, head: str = "linear", hidden: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_labels", num_labels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be an int >= 1 (or None), got {hidden!r}")
        if head == "linear" and hidden is not None:
            raise ValueError("hidden is the MLP head's width; a linear head has none (use head='mlp')")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.kind = head
        opts = dict(device=device, dtype=dtype)
        if head == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_labels, **opts))
        else:
            width = hidden or in_features
            self.net = nn.Sequential(nn.Linear(in_features, width, **opts), ACTIVATIONS[activation](),
                                     nn.Dropout(dropout), nn.Linear(width, num_labels, **opts))  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] from pooled features [B, in_features]."""
        return self.net(features)
