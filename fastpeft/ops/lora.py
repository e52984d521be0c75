"""Fused LoRA linear: ``out = x W^T + b + scaling * (dropout(x) A^T) B^T``.

One op, ``torch.ops.fastpeft.lora_linear``, over a list of projections that share the input x (one
shrink GEMM over the concatenated A matrices), for any frozen-weight format: dense, bitsandbytes
NF4/FP4 (QLoRA) or bitsandbytes LLM.int8() (``fastpeft.quant.frozen_weight_args`` builds the weight
argument). This module registers its fake kernels (autograd is in C++) and holds the plain-PyTorch
reference.

Saved for backward (csrc/lora/lora_autograd.cpp): x and the [M, sum r] shrink output (plus
references to the weights). Not saved: the dequantized weight (backward dequantizes again), the
dropout mask or dropped x (regenerated from the seed), any copy of the base output.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastpeft.ops.dropout import dropout_reference, new_seed
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import FrozenWeight, frozen_weight_args, frozen_weight_shapes

Weight = FrozenWeight

# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::lora_linear")
def _(x, weight_format, weight_tensors, weight_ints, biases, lora_A, lora_B, scalings, dropout_p, seed):
    lead = tuple(x.shape[:-1])
    outs = [x.new_empty((*lead, o)) for o, _ in frozen_weight_shapes(weight_format, weight_tensors, weight_ints)]
    shrink = x.new_empty((math.prod(lead), sum(a.shape[0] for a in lora_A)))
    return outs, shrink


@torch.library.register_fake("fastpeft::lora_linear_backward")
def _(grad_outs, x, shrink, weight_format, weight_tensors, weight_ints, lora_A, lora_B, scalings, dropout_p, seed,
      output_mask):  # fmt: skip
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    grad_A = [a.new_empty(a.shape) for a in lora_A] if output_mask[1] else []
    grad_B = [b.new_empty(b.shape) for b in lora_B] if output_mask[1] else []
    grad_w = [w.new_empty(w.shape) for w in weight_tensors] if output_mask[2] and weight_format == "dense" else []
    grad_b = [x.new_empty((b.shape[0],)) for b in lora_B] if output_mask[3] else []
    return grad_x, grad_A, grad_B, grad_w, grad_b


@torch.library.register_fake("fastpeft::lora_shrink_dropout")
def _(x, lora_A, dropout_p, seed):
    return x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("fastpeft::lora_grad_A_dropout")
def _(grad_shrink, x, dropout_p, seed):
    return x.new_empty((grad_shrink.shape[1], x.shape[1]))


@torch.library.register_fake("fastpeft::lora_grad_x_dropout_accum_")
def _(grad_x, grad_shrink, lora_A, dropout_p, seed):
    return None


# Autograd for lora_linear is registered in C++ (csrc/lora/lora_autograd.cpp):
# a Python autograd wrapper costs more per call than the layer's kernels on a GPU.

# ---- public functions ----------------------------------------------------------------------------


def _biases_for_op(biases, weights):
    if biases is None:
        return [None] * len(weights)
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"biases must have one entry (or None) per weight: {len(biases)} for {len(weights)} weights")
    return biases


def lora_linear_grouped(
    x: torch.Tensor,
    weights: Sequence[Weight],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> list:
    """LoRA on a group of projections of one input (q/k/v, gate/up): ``[lora_linear(x, W_i, ...)]``.

    One shrink GEMM runs over the concatenated ``lora_A`` matrices, and one dropout mask applies to
    the shared ``x`` (each projection sees the same dropped input, unlike peft's independent
    dropout modules). ``weights`` are all dense tensors [out_i, in], all ``Quant4bitWeight`` of
    one quant_type, or all ``Int8Weight``; ``lora_A[i]`` is [r_i, in], ``lora_B[i]`` is [out_i, r_i]; every tensor has
    x's dtype and device. ``seed`` (an int64 tensor of one element) fixes the dropout mask; by
    default a fresh one is drawn from torch's CPU generator. Returns one output per weight,
    shaped ``[..., out_i]``. (``LoRAProjectionGroup`` is the layer on this op.)
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one weight")
    biases = _biases_for_op(biases, weights)
    scalings = [float(s) for s in scalings]
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seed = (new_seed() if seed is None else seed) if dropout_p > 0 else None
    fmt, tensors, ints = frozen_weight_args(weights, x.shape[-1])
    outs, _ = torch.ops.fastpeft.lora_linear(x, fmt, tensors, ints, biases, list(lora_A), list(lora_B), scalings,
                                             dropout_p, seed)  # fmt: skip
    return list(outs)


def lora_linear_multi(*args, **kwargs) -> list:
    """Deprecated name of ``lora_linear_grouped`` (several projections of one input; not to be
    confused with ``multi_lora_linear``, several adapters in one batch)."""
    warnings.warn("fastpeft.ops.lora_linear_multi is renamed lora_linear_grouped", DeprecationWarning, stacklevel=2)
    return lora_linear_grouped(*args, **kwargs)


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused LoRA linear ``x W^T + b + scaling * (dropout(x) A^T) B^T``, forward and backward.

    ``weight`` is a dense [out, in] tensor, a ``fastpeft.quant.Quant4bitWeight`` (QLoRA) or a
    ``fastpeft.quant.Int8Weight`` (LoRA on an LLM.int8() base);
    ``lora_A`` is [r, in], ``lora_B`` [out, r], all in x's dtype (float32, float16 or bfloat16)
    on x's device; x is [..., in]. Gradients flow to x, lora_A, lora_B, the bias, and a dense
    weight that requires grad. ``dropout_p`` applies inverted dropout to x in the LoRA branch;
    its mask is a hash of ``seed`` and the element index, regenerated in backward.
    """
    return lora_linear_grouped(x, [weight], [bias], [lora_A], [lora_B], [scaling], dropout_p, seed)[0]


def lora_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-PyTorch ``lora_linear`` (autograd through ordinary ops), with the same dropout mask."""
    base = F.linear(x, dense_weight_reference(weight, x.dtype), bias)
    dropped = dropout_reference(x, dropout_p, seed) if dropout_p > 0 else x
    return base + scaling * F.linear(F.linear(dropped, lora_A), lora_B)
