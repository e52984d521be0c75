"""LoRA layers on fastpeft's fused op: a drop-in for peft's ``lora.Linear`` / ``lora.Linear4bit`` /
``lora.Linear8bitLt``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from fastpeft.nn.base import (cast, check_base_layer, fold_delta_, freeze, fused_lora_args, kind_label,
                              output_dtype)  # fmt: skip
from fastpeft.nn.base import base_kind as _base_kind
from fastpeft.nn.dora import dora_weight_norm, fused_dora_forward
from fastpeft.ops.lora import lora_linear_grouped


def fused_lora_forward(base_layer, lora_A, lora_B, scaling, dropout_p, x, kind: Optional[str] = None):
    """``base_layer(x) + scaling * (dropout(x) A^T) B^T`` through the fused op (one projection).

    A quantized base (4-bit or int8) returns x's dtype, as bitsandbytes does."""
    kind = kind or _base_kind(base_layer)
    dtype, weight, bias, A, B = fused_lora_args(base_layer, lora_A, lora_B, x, kind)
    (out,) = lora_linear_grouped(cast(x, dtype), [weight], [bias], [A], [B], [scaling], dropout_p)
    return cast(out, output_dtype(x, dtype, kind))


class LoRALinear(nn.Module):
    """Low-rank adapter around a frozen ``torch.nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or
    ``bitsandbytes.nn.Linear8bitLt`` (int8 weights, ``has_fp16_weights=False``).

    ``forward(x) = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` computed by one fused op
    (``fastpeft.ops.lora_linear``): the low-rank product is accumulated into the base output in
    place, dropout is applied inside the shrink GEMM (no mask is stored), a 4-bit or int8 weight is
    dequantized into a shared workspace and never kept, and backward keeps only x and the
    [tokens, r] shrink output.

    ``use_dora=True`` makes it peft's DoRA layer (weight-decomposed LoRA): ``forward(x) = (m / n) *
    (base(x) + scaling * B(A(x)))`` (plus the bias) with the trainable magnitude ``m =
    lora_magnitude_vector`` [out] and ``n = ||W + scaling B A||`` per output row, detached; in
    training with dropout, peft's exact form with the dropped input (``fastpeft.ops.dora_linear``).
    ``m`` starts as ``n`` (float32, as peft) and is saved under peft's key ``lora_magnitude_vector``.
    A DoRA layer runs alone (never in a ``LoRAProjectionGroup``).

    Parameters are named and initialised as in HF peft, so peft state dicts map one to one:
    ``lora_A.weight`` [r, in] (kaiming-uniform, a=sqrt(5)) and ``lora_B.weight`` [out, r] (zeros);
    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). The base layer is
    frozen. Adapter weights are float32 by default (peft's ``autocast_adapter_dtype``) and are cast
    to the compute dtype in forward; pass ``dtype`` to keep them in another dtype.

    dtypes follow the base layer's own rule (``fastpeft.nn.base``): a dense base runs in its weight's
    dtype and, like ``nn.Linear``, refuses x of another dtype (under ``torch.autocast`` it runs in
    the autocast dtype); a 4-bit base computes in ``base_layer.compute_dtype`` (else x's dtype) and
    an int8 base in x's dtype, both returning x's dtype, as bitsandbytes does.

    An int8 base computes ``x W^T`` with the dequantized weight ``W = CB * SCB / 127`` in the compute
    dtype. bitsandbytes' own 8-bit forward also quantizes x to int8 (keeping outlier columns above
    ``threshold`` in 16-bit), so the base output differs from ``base_layer(x)`` by that activation
    quantization; it equals ``F.linear(x, W)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        dtype: Optional[torch.dtype] = torch.float32,
        use_dora: bool = False,
    ):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_kind = check_base_layer(base_layer, "LoRALinear")  # "dense", "4bit" or "int8"
        self.base_layer = base_layer
        freeze(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.use_dora = bool(use_dora)
        self.reset_lora_parameters(init_lora_weights)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.dora_weight_norm().to(device=device, dtype=dtype))

    def dora_weight_norm(self) -> torch.Tensor:
        """``||W + scaling B A||_2`` per output row, float32 (DoRA's magnitude init and merge)."""
        return dora_weight_norm(self.base_layer, self.base_kind, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """peft's inits: ``True`` kaiming-uniform A (a=sqrt(5)) and zero B; ``"gaussian"`` normal A
        (std 1/r) and zero B; ``False`` keeps nn.Linear's random init of both (B nonzero)."""
        if init_lora_weights is False:
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_4bit(self) -> bool:
        """The base is a bitsandbytes 4-bit layer."""
        return self.base_kind == "4bit"

    @property
    def is_int8(self) -> bool:
        """The base is a bitsandbytes int8 (LLM.int8()) layer."""
        return self.base_kind == "int8"

    # ---- forward ---------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"{type(self).__name__}: x must be [..., {self.in_features}], got {list(x.shape)}")

    def forward_args(self, x: torch.Tensor):
        """(compute dtype, weight, bias, A, B) for the fused op, all in the compute dtype."""
        self._check_input(x)
        return fused_lora_args(self.base_layer, self.lora_A.weight, self.lora_B.weight, x, self.base_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scaling * B(A(dropout(x)))`` in one fused op (the base alone when merged).

        A layer that ``fastpeft.integrations.grouping`` put in a group of projections reading the same
        input runs through its group (one fused op for all members); see that module."""
        group = self.__dict__.get("_shared_input_group")  # not a submodule: names and state_dict stay
        if group is not None:
            return group.member_forward(self, x)
        return self._ungrouped_forward(x)

    def _ungrouped_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        self._check_input(x)
        p = self.lora_dropout if self.training else 0.0
        if self.use_dora:
            return fused_dora_forward(self, self.base_layer, self.lora_A.weight, self.lora_B.weight,
                                      self.lora_magnitude_vector, self.scaling, p, x, self.base_kind)  # fmt: skip
        return fused_lora_forward(self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling, p, x,
                                  self.base_kind)

    # ---- merge -----------------------------------------------------------------------------------

    def get_delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, the update merge() adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Add the adapter into a dense base weight; forward then runs the base layer alone."""
        if self.base_kind != "dense":
            raise NotImplementedError(
                f"merge() needs a dense base layer: a {self.base_kind.replace('4bit', '4-bit')} weight cannot hold the merged update "
                "exactly. Dequantize the base to a dense nn.Linear first."
            )
        if self.merged:
            return
        if self.use_dora:
            self._merge_dora()
        else:
            fold_delta_(self.base_layer.weight, self.get_delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        if self.use_dora:
            self._unmerge_dora()
        else:
            fold_delta_(self.base_layer.weight, self.get_delta_weight(), sign=-1.0)
        self.merged = False

    @torch.no_grad()
    def _merge_dora(self) -> None:
        # peft's DoRA merge: W <- (m / n) (W + delta), n = ||W + delta|| of the weight before; n is
        # kept (as peft caches it) so unmerge restores W = W' n / m - delta.
        weight = self.base_layer.weight
        delta = self.get_delta_weight()
        norm = torch.linalg.vector_norm(weight.float() + delta, dim=1)
        self.__dict__["_dora_merge_norm"] = norm
        factor = (self.lora_magnitude_vector.float() / norm).view(-1, 1)
        weight.copy_((factor * (weight.float() + delta)).to(weight.dtype))

    @torch.no_grad()
    def _unmerge_dora(self) -> None:
        weight = self.base_layer.weight
        norm = self.__dict__.pop("_dora_merge_norm")
        factor = (self.lora_magnitude_vector.float() / norm).view(-1, 1)
        weight.copy_((weight.float() / factor - self.get_delta_weight()).to(weight.dtype))

    def extra_repr(self) -> str:
        kind = kind_label(self.base_kind)
        dora = ", use_dora=True" if self.use_dora else ""
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout}, "
                f"base={kind}{dora}")  # fmt: skip


class LoRAProjectionGroup(nn.Module):
    """Several LoRALinear layers that read the same input (q/k/v, gate/up) run as one fused op.

    The group holds the given layers (parameters shared, nothing copied) and ``forward(x)`` returns
    their outputs as a tuple: one shrink GEMM over the concatenated A matrices, and in backward one
    GEMM for the adapters' input gradient. In training all members share one dropout mask of x
    (peft gives each projection its own), so members must have the same ``lora_dropout``.
    """

    def __init__(self, layers: Sequence[LoRALinear]):
        super().__init__()
        layers = list(layers)
        if not layers or not all(isinstance(layer, LoRALinear) for layer in layers):
            raise TypeError("LoRAProjectionGroup takes a non-empty list of LoRALinear layers")
        if len({layer.in_features for layer in layers}) != 1:
            raise ValueError("all layers of a group must have the same in_features")
        if len({layer.base_kind for layer in layers}) != 1:
            raise ValueError("a group cannot mix dense, 4-bit and int8 base layers")
        dora = [i for i, layer in enumerate(layers) if getattr(layer, "use_dora", False)]
        if dora:
            raise ValueError(f"DoRA layers (use_dora=True) run alone, not in a LoRAProjectionGroup: layers {dora}")
        if len({layer.lora_dropout for layer in layers}) != 1:
            raise ValueError("all layers of a group must have the same lora_dropout (they share one mask)")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple:
        """Every member's output for the shared input ``x``, with one shrink GEMM over the stacked A."""
        if any(layer.merged for layer in self.layers):
            return tuple(layer._ungrouped_forward(x) for layer in self.layers)
        args = [layer.forward_args(x) for layer in self.layers]
        dtypes = {a[0] for a in args}
        if len(dtypes) != 1:
            raise ValueError(f"layers of a group must share a compute dtype, got {sorted(map(str, dtypes))}")
        first = self.layers[0]
        # The members' mode, not the group's: a group put into a model (grouping) is no submodule of it.
        p = first.lora_dropout if first.training else 0.0
        outs = lora_linear_grouped(
            cast(x, args[0][0]),
            [a[1] for a in args],
            [a[2] for a in args],
            [a[3] for a in args],
            [a[4] for a in args],
            [layer.scaling for layer in self.layers],
            p,
        )
        return tuple(cast(o, output_dtype(x, args[0][0], first.base_kind)) for o in outs)
