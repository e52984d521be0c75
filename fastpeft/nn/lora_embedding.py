"""LoRA on a frozen ``torch.nn.Embedding``: a drop-in for peft's ``lora.Embedding``.

peft's math: ``base(x) + scaling * F.embedding(x, A^T) @ B^T`` with ``A = lora_embedding_A``
[r, num_embeddings] and ``B = lora_embedding_B`` [embedding_dim, r]. Computed here as one row
gather of ``A^T`` (the [tokens, r] codes; ``F.embedding`` with the base's ``padding_idx`` and
``scale_grad_by_freq``, as peft does, so the padding row of A gets no gradient) and one
``addmm`` that adds ``scaling * codes @ B^T`` into the base output: the [num_embeddings, dim] delta
is never formed, and backward keeps only the token ids and the [tokens, r] codes. peft applies no
dropout in its embedding LoRA (its ``lora_dropout`` module is unused), and neither does this layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fastpeft.nn.base import fold_delta_, freeze


def embedding_base_problem(module: nn.Module):
    """Why ``LoRAEmbedding`` cannot wrap ``module`` (None when it can): an ``nn.Embedding`` (or a
    subclass, whose own forward gives the base output) without ``max_norm`` (which renormalises the
    gathered weight rows in place) and without ``sparse`` gradients."""
    if not isinstance(module, nn.Embedding):
        return f"{type(module).__name__} is not torch.nn.Embedding"
    if module.max_norm is not None:
        return f"nn.Embedding with max_norm={module.max_norm} (renormalises rows in place)"
    if module.sparse:
        return "nn.Embedding with sparse=True gradients"
    return None


def _embed_scale(base: nn.Module):
    """peft's ``_get_embed_scale``: the scalar a scaled embedding (Gemma's) multiplies its output by."""
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def lora_embedding_forward(base_layer: nn.Embedding, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                           x: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``base_layer(x) + scaling * F.embedding(x, A^T) @ B^T`` without the [num_embeddings, dim]
    delta: gather the [tokens, r] rows of A^T, then one addmm into the base output. As in peft, the
    adapter math runs in the adapter's dtype and the result has the base output's dtype."""
    result = base_layer(x)
    codes = F.embedding(x, lora_A.t(), padding_idx=base_layer.padding_idx,
                        scale_grad_by_freq=base_layer.scale_grad_by_freq)  # fmt: skip
    dtype = torch.promote_types(result.dtype, codes.dtype)
    B_t = lora_B.t().to(codes.dtype)
    scale = _embed_scale(base_layer)
    if scale is not None:  # peft: (codes @ B^T) * scaling * embed_scale, added to the base output
        out = result.to(dtype) + ((codes @ B_t) * scaling * scale.to(codes.dtype)).to(dtype)
        return out.to(result.dtype)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), codes.reshape(-1, codes.shape[-1]).to(dtype),
                       B_t.to(dtype), alpha=scaling)  # fmt: skip
    return flat.reshape(result.shape).to(result.dtype)


class LoRAEmbedding(nn.Module):
    """Low-rank adapter around a frozen ``torch.nn.Embedding``, named and initialised as peft's
    ``lora.Embedding``: ``lora_embedding_A`` [r, num_embeddings] (zeros) and ``lora_embedding_B``
    [embedding_dim, r] (standard normal); ``init_lora_weights=False`` keeps both standard normal.
    ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).

    ``forward(x) = base_layer(x) + scaling * F.embedding(x, A^T) @ B^T`` (see
    ``lora_embedding_forward``; no dropout, as in peft). ``merge()`` / ``unmerge()`` fold
    ``scaling * (B A)^T`` into the base weight and back.
    """

    def __init__(self, base_layer: nn.Embedding, r: int, lora_alpha: float, use_rslora: bool = False,
                 init_lora_weights=True, dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        problem = embedding_base_problem(base_layer)
        if problem is not None:
            raise TypeError(f"LoRAEmbedding cannot wrap this layer: {problem}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        self.base_layer = base_layer
        freeze(base_layer)
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = base_layer.weight.device
        # peft draws both from randn first (the same random stream as peft), then resets them.
        self.lora_embedding_A = nn.Parameter(torch.randn(r, self.num_embeddings).to(device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, r).to(device=device, dtype=dtype))
        self.merged = False
        if init_lora_weights is not False:
            with torch.no_grad():
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scaling * F.embedding(x, A^T) @ B^T`` (the base alone when merged)."""
        if self.merged:
            return self.base_layer(x)
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"LoRAEmbedding: x must hold token ids (int32 / int64), got {x.dtype}")
        return lora_embedding_forward(self.base_layer, self.lora_embedding_A, self.lora_embedding_B, self.scaling, x)

    def get_delta_weight(self) -> torch.Tensor:
        """``scaling * (B A)^T`` [num_embeddings, embedding_dim] in float32, what merge() adds."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scaling

    def merge(self) -> None:
        """Add the adapter into the base weight; forward then runs the base layer alone."""
        if self.merged:
            return
        fold_delta_(self.base_layer.weight, self.get_delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        fold_delta_(self.base_layer.weight, self.get_delta_weight(), sign=-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
