"""The frozen base layer under every fused linear layer (LoRA, grouped LoRA projections, multi-LoRA,
(IA)^3, sparse deltas): which layers can be wrapped, freezing them, the dtype the fused op runs in,
and the frozen weight as the ops take it.

A base is one of three kinds, named by ``base_kind``:

* ``"dense"``: ``torch.nn.Linear``. Outside ``torch.autocast`` it runs in its weight's dtype and,
  like ``nn.Linear``, refuses an input of another dtype; under autocast it runs in the autocast dtype.
* ``"4bit"``: ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4). As bitsandbytes does: it computes in the
  layer's ``compute_dtype`` (else x's dtype) and returns x's dtype.
* ``"int8"``: ``bitsandbytes.nn.Linear8bitLt`` holding int8 weights (``has_fp16_weights=False``,
  the ``load_in_8bit`` default). As bitsandbytes does: it computes in x's dtype (the autocast dtype
  under autocast) and returns x's dtype.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from fastpeft.quant import FrozenWeight, Int8Weight, Quant4bitWeight

BASE_KINDS = ("dense", "4bit", "int8")

REPACKED_4BIT = (
    "bitsandbytes Linear4bit whose weight bitsandbytes repacked for its AVX512-BF16 CPU kernel (an "
    "eval-mode CPU forward ran on it): another layout with a bfloat16 absmax, not the standard 4-bit format"
)


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """A ``bitsandbytes.nn.Linear4bit``. bitsandbytes is never imported here: a Linear4bit can only
    exist once it was, and importing it is slow."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_linear8bit(module: nn.Module) -> bool:
    """A ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8()), whatever its ``has_fp16_weights``."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def base_kind(module: nn.Module) -> str:
    """``"4bit"``, ``"int8"`` or ``"dense"``: which frozen-weight format a layer's base holds (check
    ``base_layer_problem`` first: this does not say whether the layer can be wrapped)."""
    if is_bnb_linear4bit(module):
        return "4bit"
    if is_bnb_linear8bit(module):
        return "int8"
    return "dense"


def base_layer_problem(module: nn.Module) -> Optional[str]:
    """Why a fused linear layer cannot wrap ``module`` (None when it can): the bases are
    ``torch.nn.Linear``, bitsandbytes ``Linear4bit`` and bitsandbytes ``Linear8bitLt`` with int8 weights."""
    if type(module) is nn.Linear:
        return None
    if is_bnb_linear4bit(module):
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            return REPACKED_4BIT
        return None
    if is_bnb_linear8bit(module):
        if getattr(module.state, "has_fp16_weights", False) or module.weight.dtype != torch.int8:
            return (
                "bitsandbytes Linear8bitLt with has_fp16_weights=True (or not yet quantized): its weight is "
                f"{module.weight.dtype}, not int8"
            )
        return None
    return f"{type(module).__name__} is not nn.Linear, bitsandbytes Linear4bit or Linear8bitLt"


def is_supported_base(module: nn.Module) -> bool:
    """A layer every fused linear layer can wrap (see ``base_layer_problem``)."""
    return base_layer_problem(module) is None


def keep_standard_4bit_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a Linear4bit's weight for its AVX512-BF16 CPU kernel.

    bitsandbytes 0.50 rewrites the weight in place on the first eval-mode CPU forward whose input
    needs no grad, when the CPU has AVX512-BF16: another nibble order and the absmax rounded to
    bfloat16 (double quantization undone), which is lossy and not the layout fastpeft's kernels
    read. A wrapped base may still run bitsandbytes' own forward (peft's path under
    ``fastpeft.patch``, a merged layer), so wrapping opts it out of the repack."""
    if is_bnb_linear4bit(module) and hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def check_base_layer(module: nn.Module, owner: str) -> str:
    """Raises TypeError (naming ``owner``, the wrapping class) unless ``module`` can be wrapped;
    returns its ``base_kind``. A 4-bit base keeps bitsandbytes' standard layout from then on
    (``keep_standard_4bit_layout``)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{owner} wraps torch.nn.Linear, bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt, got "
            f"{type(module).__name__}"
        )
    problem = base_layer_problem(module)
    if problem is not None:
        raise TypeError(f"{owner} cannot wrap this layer: {problem}")
    keep_standard_4bit_layout(module)
    return base_kind(module)


def freeze(module: nn.Module) -> None:
    """The base gets no gradient: every parameter of it stops requiring grad."""
    for p in module.parameters():
        p.requires_grad_(False)


def compute_dtype(base_layer: nn.Module, x: torch.Tensor, kind: str) -> torch.dtype:
    """The dtype the fused op runs in for input ``x`` (see the module docstring for each kind).

    A dense base outside autocast raises, as ``nn.Linear`` does, when x's dtype is not its weight's:
    casting silently would downcast float64 input or double the memory of bfloat16 activations."""
    autocast = torch.is_autocast_enabled(x.device.type)
    if kind == "4bit":
        return getattr(base_layer, "compute_dtype", None) or x.dtype
    if autocast:
        return torch.get_autocast_dtype(x.device.type)
    if kind == "int8":
        return x.dtype
    weight_dtype = base_layer.weight.dtype
    if x.dtype != weight_dtype:
        raise RuntimeError(
            f"expected x of dtype {weight_dtype} (the dtype of the frozen {type(base_layer).__name__} weight), got "
            f"{x.dtype}; cast x, or the layer with .to({x.dtype}), or run under torch.autocast"
        )
    return weight_dtype


def output_dtype(x: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.dtype:
    """The dtype a layer returns: x's for quantized bases (as bitsandbytes), the compute dtype for
    dense ones (as nn.Linear, the autocast dtype under autocast)."""
    return dtype if kind == "dense" else x.dtype


def frozen_weight(base_layer: nn.Module, kind: str, dtype: torch.dtype) -> FrozenWeight:
    """The base weight as the fused ops take it: a dense tensor of ``dtype``, or the quantized weight
    read from bitsandbytes without a copy."""
    if kind == "4bit":
        return Quant4bitWeight.from_bnb(base_layer.weight)
    if kind == "int8":
        return Int8Weight.from_bnb(base_layer)
    return cast(base_layer.weight, dtype)


def fused_lora_args(base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, x: torch.Tensor,
                    kind: Optional[str] = None):  # fmt: skip
    """(compute dtype, frozen weight, bias, A, B) for the fused LoRA / DoRA ops; tensors in the
    compute dtype. ``kind`` is the base kind, ``"dense"``, ``"4bit"`` or ``"int8"`` (None: detected)."""
    kind = kind or base_kind(base_layer)
    dtype = compute_dtype(base_layer, x, kind)
    weight = frozen_weight(base_layer, kind, dtype)
    return dtype, weight, cast(base_layer.bias, dtype), cast(lora_A, dtype), cast(lora_B, dtype)


@torch.no_grad()
def fold_delta_(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> None:
    """``weight += sign * delta`` in float32, rounded once to the weight's dtype (merge / unmerge of
    an adapter's float32 update into a dense base weight)."""
    weight.copy_((weight.float() + sign * delta).to(weight.dtype))


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype`` (None stays None; no copy when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def kind_label(kind: str) -> str:
    """How a base kind reads in a module's repr."""
    return {"4bit": "nf4/fp4", "int8": "int8"}.get(kind, "dense")


# ---- FSDP1: frozen bases handed in as views ------------------------------------------------------
#
# Frozen base layers under FSDP1: what the fused layers hand the ops.
#
# FSDP1 with ``use_orig_params=True`` swaps a wrapped unit's parameters for views of one flat
# parameter during forward; the views require grad as soon as any parameter of the unit trains (an
# adapter next to its frozen base), although FSDP gives the frozen ones no gradient. The fused ops
# treat the base as frozen (``ia3_linear`` refuses a base that requires grad), so the layers give
# them the base's tensors detached in exactly that case, and nowhere else: a base parameter that
# really trains is passed as it is.


def tensor_of(module: nn.Module, name: str):
    """``module.<name>`` as a tensor (None if absent), without nn.Module's slow ``__getattr__``;
    also finds the plain tensors FSDP1 puts in place of parameters during forward."""
    t = module._parameters.get(name)
    if t is None:
        t = module.__dict__.get(name)
    return t if isinstance(t, torch.Tensor) else None


def is_fsdp1_frozen_view(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (``module.<name>`` now) is FSDP1's view of a flat parameter standing in for
    a parameter that does not require grad."""
    flat = tensor._base
    if flat is None or not getattr(flat, "_is_flat_param", False):  # FlatParameter instances are plain Parameters
        return False
    infos, params = getattr(flat, "_param_infos", None), getattr(flat, "_params", None)
    if infos is None or params is None:
        return False
    for info, param in zip(infos, params):
        if info.module is module and info.param_name == name:
            return not param.requires_grad
    return False


def trainable_base_tensor(base: nn.Module):
    """The name of ``base``'s weight or bias when it needs a gradient (FSDP1 views of frozen
    parameters do not), else None."""
    for name in ("weight", "bias"):
        t = tensor_of(base, name)
        if t is not None and t.requires_grad and not is_fsdp1_frozen_view(base, name, t):
            return name
    return None


class FrozenDenseView:
    """A dense base layer's weight and bias, detached (``weight`` / ``bias`` attributes only)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight, bias):
        self.weight = weight
        self.bias = bias


def frozen_base(base: nn.Module):
    """``base``, or a ``FrozenDenseView`` of it with detached tensors when its weight or bias
    requires grad only as FSDP1 views of frozen parameters. A base tensor that really trains leaves
    ``base`` as it is (the op then decides: ``ia3_linear`` raises)."""
    w, b = tensor_of(base, "weight"), tensor_of(base, "bias")
    w_view = w is not None and w.requires_grad
    b_view = b is not None and b.requires_grad
    if not (w_view or b_view):
        return base
    if (w_view and not is_fsdp1_frozen_view(base, "weight", w)) or (b_view and not is_fsdp1_frozen_view(base, "bias", b)):
        return base
    return FrozenDenseView(w.detach(), None if b is None else b.detach())
