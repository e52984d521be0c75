"""Fused linear cross-entropy for causal-LM heads: ``cross_entropy(h W^T + b + s (h A^T) B^T, labels)``
without ever holding the ``[tokens, vocab]`` logits or their gradient.

At Llama-3 shapes the logits of one step (2048 tokens x 128256 vocab, float32) are 1 GiB, and their
gradient another: the largest activation of a QLoRA step. ``torch.ops.fastpeft.linear_cross_entropy``
runs the tokens in chunks: per chunk the logits GEMM (ATen), the loss and logits gradient in place
(``cross_entropy_rows_``, fastpeft's CPU / CUDA kernel, float32 math), and the gradient GEMMs into
``hidden`` and the head's LoRA factors. The loss and the gradients come out of that one call (as in
Liger's fused linear cross-entropy); autograd's backward scales them by the incoming gradient.

Saved for backward: ``grad_hidden`` [tokens, hidden] and the LoRA factors' gradients, nothing of
size vocab x tokens. The frozen head weight may be dense, 4-bit or int8 (dequantized once per call
into the shared workspace).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import FrozenWeight, frozen_weight_args, frozen_weight_shapes

# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::cross_entropy_rows_")
def _(logits, labels, loss, softcap, ignore_index, grad_scale):
    return None


@torch.library.register_fake("fastpeft::linear_cross_entropy")
def _(hidden, weight_format, weight_tensors, weight_ints, bias, labels, lora_A, lora_B, lora_scaling, ignore_index,
      reduction, softcap, chunk_tokens, output_mask):  # fmt: skip
    frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_h = hidden.new_empty(hidden.shape) if output_mask[0] else hidden.new_empty((0,))
    lora = output_mask[1] and lora_A is not None
    grad_A = lora_A.new_empty(lora_A.shape) if lora else hidden.new_empty((0,))
    grad_B = lora_B.new_empty(lora_B.shape) if lora else hidden.new_empty((0,))
    return loss, grad_h, grad_A, grad_B


# ---- autograd --------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """The op computes the gradients with the loss; backward scales them (one call per training step,
    so a Python Function costs nothing that matters)."""

    @staticmethod
    def forward(ctx, hidden, lora_A, lora_B, weight_args, bias, labels, lora_scaling, ignore_index, reduction,
                softcap, chunk_tokens):  # fmt: skip
        fmt, tensors, ints = weight_args
        need_h = ctx.needs_input_grad[0]
        need_lora = lora_A is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        loss, grad_h, grad_A, grad_B = torch.ops.fastpeft.linear_cross_entropy(
            hidden, fmt, tensors, ints, bias, labels, lora_A, lora_B, lora_scaling, ignore_index, reduction, softcap,
            chunk_tokens, [need_h, need_lora],
        )  # fmt: skip
        ctx.save_for_backward(grad_h, grad_A, grad_B)
        ctx.need = (need_h, need_lora)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_A, grad_B = ctx.saved_tensors
        need_h, need_lora = ctx.need
        g = grad_loss.to(torch.float32)
        out_h = (grad_h * g).to(grad_h.dtype) if need_h else None
        out_A = (grad_A * g).to(grad_A.dtype) if need_lora else None
        out_B = (grad_B * g).to(grad_B.dtype) if need_lora else None
        return out_h, out_A, out_B, None, None, None, None, None, None, None, None


# ---- public functions ----------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: FrozenWeight,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    lora_scaling: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=, reduction=)`` with
    ``logits = hidden W^T + bias + lora_scaling * (hidden A^T) B^T`` (softcapped as
    ``softcap * tanh(logits / softcap)`` when ``softcap`` is given, Gemma-2 style), without holding
    the ``[tokens, vocab]`` logits or their gradient.

    ``hidden`` [..., H] (float32 / float16 / bfloat16; the GEMMs run in its dtype, the softmax in
    float32); ``weight`` the frozen head [V, H]: a dense tensor, ``Quant4bitWeight`` or ``Int8Weight``;
    ``labels`` int64 of hidden's leading shape (already shifted for next-token prediction), entries
    ``ignore_index`` skipped; ``lora_A`` [r, H] / ``lora_B`` [V, r] an optional LoRA on the head (both
    or neither, in hidden's dtype). ``reduction`` "mean" (over the tokens not ignored) or "sum".
    ``chunk_tokens`` tokens per chunk (0: about 64 MiB of logits per chunk). Gradients flow to
    ``hidden`` and the LoRA factors; the head weight and bias are frozen. Returns a float32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("linear_cross_entropy treats the head weight as frozen; call .requires_grad_(False) on it")
    if bias is not None and bias.requires_grad:
        raise ValueError("linear_cross_entropy treats the head bias as frozen; call .requires_grad_(False) on it")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    weight_args = frozen_weight_args([weight], hidden.shape[-1], name="weight")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(h2, lora_A, lora_B, weight_args, bias, labels.reshape(-1).long(),
                                     float(lora_scaling), int(ignore_index), reduction, float(softcap or 0.0),
                                     int(chunk_tokens))  # fmt: skip


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: FrozenWeight,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    lora_scaling: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Plain PyTorch, as transformers computes a causal-LM loss: the whole logits tensor in hidden's
    dtype, then float32 cross-entropy (``chunk_tokens`` is ignored)."""
    logits = F.linear(hidden, dense_weight_reference(weight, hidden.dtype), bias)
    if lora_A is not None:
        logits = logits + lora_scaling * F.linear(F.linear(hidden, lora_A), lora_B)
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=ignore_index,
                           reduction=reduction)  # fmt: skip
