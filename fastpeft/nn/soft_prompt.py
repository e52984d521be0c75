"""Soft prompts: virtual token embeddings prepended to a model's input embeddings.

* ``SoftPrompt``: prompt tuning (Lester et al. 2021): P free embeddings, initialised at random,
  from random vocabulary words, from given text, or from class-label words.
* ``PromptEncoder``: P-tuning (Liu et al. 2021): P embeddings passed through an MLP or a
  bidirectional LSTM + MLP before they are prepended.

Both hold a bank of N prompts and take a per-example ``prompt_index`` (one prompt per task or user
in one batch). Calling the module on input embeddings returns the model inputs with the prompts
prepended, the attention mask extended by P ones and the labels by P ignored positions (-100), as
peft's ``PromptTuningConfig`` / ``PromptEncoderConfig`` models do. Parameter names follow peft's
(``embedding.weight``, ``mlp_head.*``, ``lstm_head.*``), so with N = 1 state dicts load either way.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

IGNORE_INDEX = -100  # the label HF losses skip


class _PrependsPrompts(nn.Module):
    """Shared prepend logic: subclasses define ``prompts()`` -> [N, P, E]."""

    num_prompts: int
    num_virtual_tokens: int

    def prompts(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        prompt_index: Optional[torch.Tensor] = None,
    ) -> dict:
        """Model inputs with the prompts in front: ``inputs_embeds`` [B, P + S, E] and, when given,
        ``attention_mask`` [B, P + S] and ``labels`` [B, P + S]. ``prompt_index`` [B] selects each
        example's prompt (default: prompt 0)."""
        B, P = inputs_embeds.shape[0], self.num_virtual_tokens
        prompts = self.prompts().to(inputs_embeds.dtype)
        if prompt_index is None:
            chosen = prompts[0].expand(B, -1, -1)
        else:
            if prompt_index.shape != (B,):
                raise ValueError(f"prompt_index must have shape [B={B}], got {tuple(prompt_index.shape)}")
            if B and (int(prompt_index.min()) < 0 or int(prompt_index.max()) >= self.num_prompts):
                raise ValueError(f"prompt_index must be in [0, {self.num_prompts}), got {prompt_index.tolist()}")
            chosen = prompts[prompt_index.to(prompts.device)]
        out = {"inputs_embeds": torch.cat([chosen, inputs_embeds], dim=1)}
        if attention_mask is not None:
            ones = attention_mask.new_ones((B, P))
            out["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((B, P), IGNORE_INDEX), labels], dim=1)
        return out

    def model_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask=None, labels=None,
                     prompt_index=None) -> dict:  # fmt: skip
        """``forward`` on an HF model's embeddings of ``input_ids``: keyword arguments for
        ``model(**inputs)`` or ``model.generate(**inputs)``."""
        return self(model.get_input_embeddings()(input_ids), attention_mask, labels, prompt_index)


def repeat_to_length(token_ids: Sequence[int], length: int) -> list:
    """peft's TEXT initialisation: truncate, or repeat the ids until ``length`` are there."""
    token_ids = list(token_ids)
    if not token_ids:
        raise ValueError("need at least one token id to initialise from")
    return (token_ids * math.ceil(length / len(token_ids)))[:length]


class SoftPrompt(_PrependsPrompts):
    """Prompt tuning: a bank of ``num_prompts`` prompts of ``num_virtual_tokens`` embeddings.

    Initialisation (``init``):
        "random":      N(0, 1), as peft's RANDOM;
        "vocab":       embeddings of random vocabulary tokens (``word_embeddings`` required);
        "text":        embeddings of ``init_token_ids`` (a tokenised text), truncated or repeated
                       to P as peft's TEXT does;
        "class_labels": virtual token i starts as the mean embedding of label word
                       ``i % len(labels)``, each given as its token ids in ``init_token_ids``.
    Every prompt of the bank starts the same way (vocab samples differ per prompt).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        embed_dim: int,
        num_prompts: int = 1,
        init: str = "random",
        word_embeddings: Optional[nn.Embedding] = None,
        init_token_ids=None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if num_virtual_tokens < 1 or num_prompts < 1:
            raise ValueError(f"num_virtual_tokens and num_prompts must be >= 1, got {num_virtual_tokens}, {num_prompts}")
        self.num_virtual_tokens, self.num_prompts, self.embed_dim = num_virtual_tokens, num_prompts, embed_dim
        self.embedding = nn.Embedding(num_prompts * num_virtual_tokens, embed_dim, dtype=dtype, device=device)
        if init == "random":
            return
        if word_embeddings is None:
            raise ValueError(f"init={init!r} needs the model's word_embeddings")
        P, N = num_virtual_tokens, num_prompts
        with torch.no_grad():
            weight = word_embeddings.weight
            if init == "vocab":
                ids = torch.randint(0, weight.shape[0], (N * P,), device=weight.device)
                table = weight[ids]
            elif init == "text":
                if init_token_ids is None:
                    raise ValueError("init='text' needs init_token_ids (the tokenised text)")
                ids = torch.tensor(repeat_to_length(init_token_ids, P), device=weight.device)
                table = weight[ids].repeat(N, 1)
            elif init == "class_labels":
                if not init_token_ids or not all(len(label) for label in init_token_ids):
                    raise ValueError("init='class_labels' needs init_token_ids: one non-empty id list per label")
                means = torch.stack([weight[torch.tensor(label, device=weight.device)].mean(0) for label in init_token_ids])
                table = means[torch.arange(P) % len(init_token_ids)].repeat(N, 1)
            else:
                raise ValueError(f"init must be 'random', 'vocab', 'text' or 'class_labels', got {init!r}")
            self.embedding.weight.copy_(table.to(self.embedding.weight))

    def prompts(self) -> torch.Tensor:
        """The bank of prompts [N, P, E] (the embeddings themselves)."""
        return self.embedding.weight.view(self.num_prompts, self.num_virtual_tokens, self.embed_dim)


class PromptEncoder(_PrependsPrompts):
    """P-tuning's prompt encoder: embeddings -> MLP, or -> bidirectional LSTM -> MLP.

    The layers match peft's ``PromptEncoder``: "mlp" is Linear-ReLU-Linear-ReLU-Linear
    (token_dim -> hidden -> hidden -> token_dim); "lstm" is an ``encoder_num_layers``-layer
    bidirectional LSTM of width ``hidden`` followed by Linear-ReLU-Linear (2 hidden -> token_dim).
    Each prompt of the bank goes through the shared encoder as one sequence of P tokens.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        encoder_hidden_size: Optional[int] = None,
        encoder_type: str = "mlp",
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
        num_prompts: int = 1,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        self.num_virtual_tokens, self.num_prompts, self.token_dim = num_virtual_tokens, num_prompts, token_dim
        self.encoder_type = encoder_type.lower()
        hidden = encoder_hidden_size or token_dim
        factory = dict(dtype=dtype, device=device)
        self.embedding = nn.Embedding(num_prompts * num_virtual_tokens, token_dim, **factory)
        if self.encoder_type == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden, **factory), nn.ReLU(),
                nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                nn.Linear(hidden, token_dim, **factory),
            )  # fmt: skip
        elif self.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True, **factory)  # fmt: skip
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(), nn.Linear(2 * hidden, token_dim, **factory)
            )
        else:
            raise ValueError(f"encoder_type must be 'mlp' or 'lstm', got {encoder_type!r}")

    def prompts(self) -> torch.Tensor:
        """The bank of prompts [N, P, E]: the virtual token embeddings through the encoder."""
        tokens = self.embedding.weight.view(self.num_prompts, self.num_virtual_tokens, self.token_dim)
        if self.encoder_type == "lstm":
            tokens = self.lstm_head(tokens)[0]
        return self.mlp_head(tokens)
