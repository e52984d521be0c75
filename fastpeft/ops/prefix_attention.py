"""Prefix-KV attention: every query attends to P learned prefix keys/values plus its own sequence.

``torch.ops.fastpeft.prefix_attention`` computes

    out = softmax([q prefix_k[i]^T | mask(q k^T)] * scale) [prefix_v[i]; v],   i = prefix_index[b]

for q [B, H, Sq, D], k/v [B, Hkv, Skv, D] (GQA: H a multiple of Hkv) and a bank of N prefix sets
prefix_k/v [N, Hkv, P, D], one chosen per example. The attention mask and causality apply to the
sequence keys only; causality is aligned to the last key (query i sees key j iff
j <= i + Skv - Sq), so decoding with a KV cache (Sq = 1) sees the whole cache and the prefix.

How: the sequence part runs in PyTorch's fused attention kernels, which also return its
log-sum-exp. The prefix part is the same fused kernel over each example's prefix keys, merged by
log-sum-exp (FlashInfer's merge_state idea). Backward hands the merged output and log-sum-exp to
the fused attention backward, which then yields the sequence part of the joint gradient and,
called for the prefix keys, the prefix part (the cascade-attention identity).

Saved for backward: q, k, v, the prefix bank, prefix_index, the mask, out and the fp32 [B, H, Sq]
log-sum-exp. Never allocated, forward or backward: ``[prefix; keys]`` (docs/prefix.md, Memory,
for the per-example prefix tensors of the CPU path). The bank gradients are summed per set over
the examples that used it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::prefix_attention")
def _(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, causal, scale):
    B, H, Sq, D = q.shape
    # The layout the device's fused kernels write (csrc/prefix_attention/prefix_attention.cpp,
    # empty_output): on CUDA [B, H, Sq, D] stored as [B, Sq, H, D], as HF reads it back; on the CPU
    # contiguous, as the CPU kernel writes it and reads it in backward.
    out = q.new_empty((B, H, Sq, D)) if q.device.type == "cpu" else q.new_empty((B, Sq, H, D)).transpose(1, 2)
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("fastpeft::prefix_attention_backward")
def _(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, out, lse, causal, scale, output_mask):
    inputs = (q, k, v, prefix_k, prefix_v)
    return tuple(torch.empty_like(t) if need else t.new_empty((0,)) for need, t in zip(output_mask, inputs))


# ---- autograd ------------------------------------------------------------------------------------
# prefix_attention has a C++ autograd kernel (csrc/prefix_attention/prefix_attention_autograd.cpp):
# Python register_autograd would cost ~0.3 ms per layer and step.

# ---- public functions ----------------------------------------------------------------------------


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_index: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention of q over a per-example prefix set followed by the (masked, causal) sequence.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D] with H a multiple of Hkv. float32/16, bfloat16.
        prefix_k, prefix_v: the bank [N, Hkv, P, D] (N = 1 for one shared prefix).
        prefix_index: int64 [B], the set of each example (None: set 0 for all). Values are
            checked against N (on a GPU one host sync per index tensor: the layers of a forward
            that share it are checked once).
        attention_mask: for the sequence keys only: bool (True = attend) or additive float,
            [B, Skv] (key padding) or broadcastable to [B, H, Sq, Skv]. Not differentiable.
        causal: query i sees sequence key j iff j <= i + Skv - Sq (aligned to the last key).
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the fp32 log-sum-exp [B, H, Sq] of each row (no gradient).

    Returns ``out`` [B, H, Sq, D] (stored as [B, Sq, H, D] on CUDA, contiguous on the CPU: the
    layout each device's fused kernels write), or ``(out, lse)``. Gradients flow to
    q, k, v, prefix_k and prefix_v. On devices without a fastpeft kernel (neither CPU nor CUDA)
    the plain-PyTorch reference runs instead.
    """
    if attention_mask is not None and attention_mask.requires_grad:
        raise ValueError("prefix_attention: attention_mask is not differentiable; pass attention_mask.detach()")
    if q.device.type not in ("cpu", "cuda"):
        out = prefix_attention_reference(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, causal, scale)
        return (out, None) if return_lse else out
    scale = None if scale is None else float(scale)
    out, lse = torch.ops.fastpeft.prefix_attention(
        q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, bool(causal), scale
    )
    return (out, lse) if return_lse else out


def sequence_bias(attention_mask, causal, B, Sq, Skv, dtype, device) -> torch.Tensor:
    """The additive float bias [B|1, H|1, Sq, Skv] the op applies to the sequence keys."""
    bias = torch.zeros(1, 1, Sq, Skv, dtype=dtype, device=device)
    if attention_mask is not None:
        m = attention_mask.view(attention_mask.shape[0], 1, 1, -1) if attention_mask.dim() == 2 else attention_mask
        m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
        bias = bias + m
    if causal:
        future = torch.arange(Skv, device=device)[None, :] > torch.arange(Sq, device=device)[:, None] + (Skv - Sq)
        bias = bias.masked_fill(future, float("-inf"))
    return bias


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_index: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Plain PyTorch: gather each example's prefix, concatenate it in front of the keys, and run
    SDPA with a mask that shows every prefix position. What peft's prefix tuning computes, and
    what the op must match (it builds exactly the tensors the op never builds)."""
    B, Sq, Skv, P = q.shape[0], q.shape[2], k.shape[2], prefix_k.shape[2]
    index = prefix_index if prefix_index is not None else torch.zeros(B, dtype=torch.long, device=q.device)
    index = index.to(q.device, torch.long)
    keys = torch.cat([prefix_k[index], k], dim=2)
    values = torch.cat([prefix_v[index], v], dim=2)
    bias = sequence_bias(attention_mask, causal, B, Sq, Skv, q.dtype, q.device)
    bias = torch.cat([torch.zeros(*bias.shape[:3], P, dtype=q.dtype, device=q.device), bias], dim=-1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale, enable_gqa=True)
