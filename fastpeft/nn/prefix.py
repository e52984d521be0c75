"""PrefixEncoder: the learned per-layer prefix keys and values of prefix tuning and P-tuning v2.

Prefix tuning (Li & Liang 2021) learns, for every layer, P key and value vectors per kv head that
every query attends to before its sequence; optionally through a reparameterising MLP
(embedding -> Linear -> Tanh -> Linear, peft's ``prefix_projection=True``), which stabilises
training. P-tuning v2's deep prompts are the same prefixes without the MLP
(``prefix_projection=False``). A bank of N prefix sets (one per user or task) lives in one module;
``fastpeft.ops.prefix_attention`` picks one per example.

Parameter names and shapes follow peft's ``PrefixEncoder`` (``embedding.weight``,
``transform.0/2.*``; with N = 1 the state dicts are interchangeable), with GQA handled as peft does:
the prefix has the model's kv heads.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrefixEncoder(nn.Module):
    """Per-layer prefix K/V for a bank of ``num_prefixes`` sets of ``num_virtual_tokens`` positions.

    Args:
        num_layers, num_kv_heads, head_dim: the attention layout of the model.
        num_virtual_tokens: P, the prefix length.
        num_prefixes: N, the number of prefix sets in the bank.
        prefix_projection: produce the prefixes through peft's reparameterising MLP.
        token_dim: width of the MLP's input embeddings (default num_kv_heads * head_dim, as peft).
        encoder_hidden_size: hidden width of the MLP (default token_dim).
        init: "random" (N(0, 1) embeddings, as peft) or "zero" (prefix K/V start at zero).

    ``layer(i)`` returns layer i's ``(prefix_k, prefix_v)``, each [N, num_kv_heads, P, head_dim];
    ``forward()`` returns the list of all layers' pairs. Without the MLP these are views of the
    embedding table; with it only layer i's rows of the last Linear are evaluated.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int,
        num_prefixes: int = 1,
        prefix_projection: bool = False,
        token_dim: Optional[int] = None,
        encoder_hidden_size: Optional[int] = None,
        init: str = "random",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if init not in ("random", "zero"):
            raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
        for name, value in dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                num_virtual_tokens=num_virtual_tokens, num_prefixes=num_prefixes).items():  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens, self.num_prefixes = num_virtual_tokens, num_prefixes
        self.prefix_projection = prefix_projection
        kv_dim = num_kv_heads * head_dim
        rows = num_prefixes * num_virtual_tokens
        factory = dict(dtype=dtype, device=device)
        if prefix_projection:
            token_dim = token_dim or kv_dim
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(rows, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, **factory), nn.Tanh(), nn.Linear(hidden, num_layers * 2 * kv_dim, **factory)
            )
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(rows, num_layers * 2 * kv_dim, **factory)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)

    @staticmethod
    def layout_of(config) -> tuple:
        """(layers, kv heads, head dim) of an HF config (Llama/Qwen2/Mistral style: GQA, head_dim)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return config.num_hidden_layers, kv_heads, head_dim

    @classmethod
    def for_model(cls, config, num_virtual_tokens: int, **kwargs) -> "PrefixEncoder":
        """A PrefixEncoder sized for the model an HF config describes."""
        return cls(*cls.layout_of(config), num_virtual_tokens, **kwargs)

    def _split(self, table: torch.Tensor, layers: int):
        # [N * P, layers * 2 * Hkv * D] -> [layers, 2, N, Hkv, P, D] (a view: no copy)
        N, P, H, D = self.num_prefixes, self.num_virtual_tokens, self.num_kv_heads, self.head_dim
        return table.view(N, P, layers, 2, H, D).permute(2, 3, 0, 4, 1, 5)

    def layer(self, index: int):
        """``(prefix_k, prefix_v)`` of layer ``index``, each [N, num_kv_heads, P, head_dim]."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index {index} out of range for {self.num_layers} layers")
        width = 2 * self.num_kv_heads * self.head_dim
        rows = slice(index * width, (index + 1) * width)
        if self.prefix_projection:
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            table = F.linear(hidden, last.weight[rows], last.bias[rows])
        else:
            table = self.embedding.weight[:, rows]
        k, v = self._split(table, 1)[0]
        return k, v

    def forward(self):
        """All layers' ``(prefix_k, prefix_v)`` pairs, computed in one pass."""
        table = self.transform(self.embedding.weight) if self.prefix_projection else self.embedding.weight
        return [(k, v) for k, v in self._split(table, self.num_layers)]

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"virtual_tokens={self.num_virtual_tokens}, prefixes={self.num_prefixes}, "
                f"prefix_projection={self.prefix_projection}")  # fmt: skip
