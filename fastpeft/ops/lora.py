"""Fused LoRA linear: ``out = x W^T + b + scaling * (dropout(x) A^T) B^T``.

The ops are ``torch.ops.fastpeft.lora_linear`` (dense W), ``torch.ops.fastpeft.lora_linear_4bit``
(bitsandbytes NF4/FP4 W) and ``torch.ops.fastpeft.lora_linear_8bit`` (bitsandbytes LLM.int8() W,
int8 rows with a float32 absmax each), each over a list of projections that share the input x (one shrink GEMM
over the concatenated A matrices). This module registers their fake kernels and autograd, and
holds the plain-PyTorch reference.

Saved for backward (csrc/lora/lora_autograd.cpp): x and the [M, sum r] shrink output (plus
references to the weights). Not saved: the dequantized weight (backward dequantizes again), the
dropout mask or dropped x (regenerated from the seed), any copy of the base output.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fastpeft.ops.dropout import dropout_reference, new_seed
from fastpeft.ops.quant4bit import dequantize_4bit_reference
from fastpeft.quant import Int8Weight, Quant4bitWeight

Weight = Union[torch.Tensor, Quant4bitWeight, Int8Weight]

# ---- fake (meta) kernels -------------------------------------------------------------------------


def _fake_forward(x, lora_A, out_features):
    lead = tuple(x.shape[:-1])
    outs = [x.new_empty((*lead, o)) for o in out_features]
    shrink = x.new_empty((math.prod(lead), sum(a.shape[0] for a in lora_A)))
    return outs, shrink


def _fake_backward(mask, x, lora_A, lora_B, n_weights=0, weights=()):
    grad_x = x.new_empty(x.shape) if mask[0] else x.new_empty((0,))
    grad_A = [a.new_empty(a.shape) for a in lora_A] if mask[1] else []
    grad_B = [b.new_empty(b.shape) for b in lora_B] if mask[1] else []
    grad_w = [w.new_empty(w.shape) for w in weights] if mask[2] else []
    grad_b = [x.new_empty((b.shape[0],)) for b in lora_B] if mask[-1] else []
    return grad_x, grad_A, grad_B, grad_w, grad_b


@torch.library.register_fake("fastpeft::lora_linear")
def _(x, weights, biases, lora_A, lora_B, scalings, dropout_p, seed):
    return _fake_forward(x, lora_A, [w.shape[0] for w in weights])


@torch.library.register_fake("fastpeft::lora_linear_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, out_features, blocksizes,
      nested_blocksizes, quant_type, biases, lora_A, lora_B, scalings, dropout_p, seed):  # fmt: skip
    return _fake_forward(x, lora_A, out_features)


@torch.library.register_fake("fastpeft::lora_linear_backward")
def _(grad_outs, x, shrink, weights, lora_A, lora_B, scalings, dropout_p, seed, output_mask):
    return _fake_backward(output_mask, x, lora_A, lora_B, weights=weights)


@torch.library.register_fake("fastpeft::lora_linear_4bit_backward")
def _(grad_outs, x, shrink, packed, absmax, nested_absmax, nested_code, nested_offset, out_features,
      blocksizes, nested_blocksizes, quant_type, lora_A, lora_B, scalings, dropout_p, seed, output_mask):  # fmt: skip
    gx, ga, gb, _, gbias = _fake_backward([output_mask[0], output_mask[1], False, output_mask[2]], x, lora_A, lora_B)
    return gx, ga, gb, gbias


@torch.library.register_fake("fastpeft::lora_linear_8bit")
def _(x, weights, scales, biases, lora_A, lora_B, scalings, dropout_p, seed):
    return _fake_forward(x, lora_A, [w.shape[0] for w in weights])


@torch.library.register_fake("fastpeft::lora_linear_8bit_backward")
def _(grad_outs, x, shrink, weights, scales, lora_A, lora_B, scalings, dropout_p, seed, output_mask):
    gx, ga, gb, _, gbias = _fake_backward([output_mask[0], output_mask[1], False, output_mask[2]], x, lora_A, lora_B)
    return gx, ga, gb, gbias


@torch.library.register_fake("fastpeft::lora_shrink_dropout")
def _(x, lora_A, dropout_p, seed):
    return x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("fastpeft::lora_grad_A_dropout")
def _(grad_shrink, x, dropout_p, seed):
    return x.new_empty((grad_shrink.shape[1], x.shape[1]))


@torch.library.register_fake("fastpeft::lora_grad_x_dropout_accum_")
def _(grad_x, grad_shrink, lora_A, dropout_p, seed):
    return None


# Autograd for lora_linear, lora_linear_4bit and lora_linear_8bit is registered in C++ (csrc/lora/lora_autograd.cpp):
# a Python autograd wrapper costs more per call than the layer's kernels on a GPU.

# ---- public functions ----------------------------------------------------------------------------


def _biases_for_op(biases, weights):
    if biases is None:
        return [None] * len(weights)
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"biases must have one entry (or None) per weight: {len(biases)} for {len(weights)} weights")
    return biases


def lora_linear_multi(
    x: torch.Tensor,
    weights: Sequence[Weight],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> list:
    """LoRA on several projections of one input (q/k/v, gate/up): ``[lora_linear(x, W_i, ...)]``.

    One shrink GEMM runs over the concatenated ``lora_A`` matrices, and one dropout mask applies to
    the shared ``x`` (each projection sees the same dropped input, unlike peft's independent
    dropout modules). ``weights`` are all dense tensors [out_i, in], all ``Quant4bitWeight`` of
    one quant_type, or all ``Int8Weight``; ``lora_A[i]`` is [r_i, in], ``lora_B[i]`` is [out_i, r_i]; every tensor has
    x's dtype and device. ``seed`` (an int64 tensor of one element) fixes the dropout mask; by
    default a fresh one is drawn from torch's CPU generator. Returns one output per weight,
    shaped ``[..., out_i]``.
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
    if all(isinstance(w, torch.Tensor) for w in weights):
        outs, _ = torch.ops.fastpeft.lora_linear(x, weights, biases, list(lora_A), list(lora_B), scalings, dropout_p, seed)
        return list(outs)
    for i, w in enumerate(weights):
        if isinstance(w, (Quant4bitWeight, Int8Weight)) and (len(w.shape) != 2 or w.shape[1] != x.shape[-1]):
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)} but x has {x.shape[-1]} features")
    if all(isinstance(w, Int8Weight) for w in weights):
        outs, _ = torch.ops.fastpeft.lora_linear_8bit(
            x, [w.data for w in weights], [w.scale for w in weights], biases, list(lora_A), list(lora_B), scalings,
            dropout_p, seed,
        )  # fmt: skip
        return list(outs)
    if not all(isinstance(w, Quant4bitWeight) for w in weights):
        raise TypeError(
            "weights must be all torch.Tensor (dense), all fastpeft.quant.Quant4bitWeight or all "
            "fastpeft.quant.Int8Weight"
        )
    quant_types = {w.quant_type for w in weights}
    if len(quant_types) != 1:
        raise ValueError(f"all 4-bit weights of one call must share a quant_type, got {sorted(quant_types)}")
    outs, _ = torch.ops.fastpeft.lora_linear_4bit(
        x,
        [w.packed for w in weights],
        [w.absmax for w in weights],
        [w.nested_absmax for w in weights],
        [w.nested_code for w in weights],
        [w.nested_offset for w in weights],
        [w.shape[0] for w in weights],
        [w.blocksize for w in weights],
        [w.nested_blocksize for w in weights],
        quant_types.pop(),
        biases,
        list(lora_A),
        list(lora_B),
        scalings,
        dropout_p,
        seed,
    )
    return list(outs)


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
    return lora_linear_multi(x, [weight], [bias], [lora_A], [lora_B], [scaling], dropout_p, seed)[0]


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
    if isinstance(weight, Quant4bitWeight):
        w = dequantize_4bit_reference(weight, x.dtype)
    elif isinstance(weight, Int8Weight):
        w = weight.dequantize_reference(x.dtype)
    else:
        w = weight
    base = F.linear(x, w, bias)
    dropped = dropout_reference(x, dropout_p, seed) if dropout_p > 0 else x
    return base + scaling * F.linear(F.linear(dropped, lora_A), lora_B)
