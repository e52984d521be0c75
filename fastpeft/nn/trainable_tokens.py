"""Trainable tokens: peft's ``trainable_token_indices`` (``TrainableTokensWrapper``) on a frozen
``torch.nn.Embedding``.

The rows ``token_indices`` of the embedding train as a [n, dim] tensor
``token_adapter.trainable_tokens_delta`` (peft's name and checkpoint key; it starts as a copy of
those rows, and replaces them, as in peft). peft computes every forward as
``F.embedding(x, W.index_copy(0, indices, delta))``: a copy of the whole [num_embeddings, dim]
weight per call. Here the base lookup runs as it is and only the positions holding a trainable
token take their row from ``delta`` (a [num_embeddings] int table maps a token to its row of
delta): no weight-sized tensor is made, and backward keeps the token slots and a mask.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fastpeft.nn.base import freeze
from fastpeft.nn.lora_embedding import _embed_scale, embedding_base_problem


def trainable_tokens_base_problem(module: nn.Module):
    """Why ``TrainableTokensEmbedding`` cannot wrap ``module`` (None when it can)."""
    problem = embedding_base_problem(module)
    if problem is None and module.scale_grad_by_freq:
        problem = "nn.Embedding with scale_grad_by_freq=True"
    return problem


def check_token_indices(indices, num_embeddings: int) -> list:
    """``indices`` as a list of distinct ints in [0, num_embeddings); raises ValueError otherwise."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(f"token_indices must be a non-empty list of token ids, got {indices!r}")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_embeddings]
    if bad:
        raise ValueError(f"token_indices must be ints in [0, {num_embeddings}) (the embedding's rows), got {bad[:5]}")
    if len(set(indices)) != len(indices):
        raise ValueError("token_indices must not repeat a token id")
    return list(indices)


class TokenAdapter(nn.Module):
    """Holds the trainable rows under peft's names (``token_adapter.trainable_tokens_delta``)."""

    def __init__(self, delta: torch.Tensor, token_indices: Sequence[int]):
        super().__init__()
        self.trainable_tokens_delta = nn.Parameter(delta)
        self.token_indices = list(token_indices)


class TrainableTokensEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose rows ``token_indices`` train (peft's trainable tokens).

    ``forward(x)`` equals ``F.embedding(x, W')`` with ``W'`` the base weight with its rows
    ``token_indices`` replaced by ``token_adapter.trainable_tokens_delta`` (times the base's
    ``embed_scale`` if it has one, as peft applies it); gradients reach the delta only."""

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int]):
        super().__init__()
        problem = trainable_tokens_base_problem(base_layer)
        if problem is not None:
            raise TypeError(f"TrainableTokensEmbedding cannot wrap this layer: {problem}")
        indices = check_token_indices(token_indices, base_layer.num_embeddings)
        self.base_layer = base_layer
        freeze(base_layer)
        weight = base_layer.weight
        index = torch.tensor(indices, device=weight.device)
        self.token_adapter = TokenAdapter(weight.detach()[index].clone(), indices)
        slot = torch.full((base_layer.num_embeddings,), -1, dtype=torch.int64, device=weight.device)
        slot[index] = torch.arange(len(indices), device=weight.device)
        self.register_buffer("token_slot", slot, persistent=False)  # token id -> row of delta, -1: frozen
        pad = base_layer.padding_idx
        # peft's F.embedding(padding_idx=...) gives the padding row no gradient: so does its slot here.
        self._delta_padding_idx = int(slot[pad]) if pad is not None and int(slot[pad]) >= 0 else None
        self.merged = False

    @property
    def token_indices(self) -> list:
        """The token ids whose rows train, in the order of the delta's rows."""
        return self.token_adapter.token_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base embedding of ``x`` with the trainable rows in place of their tokens' rows."""
        out = self.base_layer(x)
        if self.merged:
            return out
        slot = self.token_slot[x]
        rows = F.embedding(slot.clamp_min(0), self.token_adapter.trainable_tokens_delta,
                           padding_idx=self._delta_padding_idx)  # fmt: skip
        scale = _embed_scale(self.base_layer)
        if scale is not None:
            rows = rows * scale.to(rows.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows.to(out.dtype), out)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained rows into the base weight (peft's merge); forward then runs the base alone."""
        if self.merged:
            return
        weight = self.base_layer.weight
        index = torch.tensor(self.token_indices, device=weight.device)
        self._originals = weight[index].clone()
        weight.index_copy_(0, index, self.token_adapter.trainable_tokens_delta.to(weight))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original rows back."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.index_copy_(0, torch.tensor(self.token_indices, device=weight.device), self._originals)
        del self._originals
        self.merged = False

    def extra_repr(self) -> str:
        return f"trainable tokens={len(self.token_indices)}"
