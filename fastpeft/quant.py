"""bitsandbytes quantized weights as plain tensors: 4-bit (NF4 / FP4, double-quantized or not) and
int8 row-wise (LLM.int8(), ``Linear8bitLt``).

``Quant4bitWeight.from_bnb`` reads a ``bitsandbytes.nn.Params4bit`` (or a ``Linear4bit`` layer, or
a packed tensor with its ``QuantState``) without copying the packed weight: ``packed`` is a uint8
view of the same storage. fastpeft's kernels take these tensors; bitsandbytes itself is only
needed to produce them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import torch

from fastpeft._extension import _C

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Quant4bitWeight:
    """A frozen 4-bit weight in bitsandbytes' layout.

    Element ``e`` of the row-major weight is the high (even ``e``) or low (odd ``e``) nibble of
    ``packed[e // 2]``, scaled by ``absmax[e // blocksize]``. When double-quantized, ``absmax`` holds
    uint8 codes and the scale of block ``b`` is
    ``nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + nested_offset``.
    """

    packed: torch.Tensor  # uint8 [ceil(numel / 2)], a view of the bitsandbytes storage
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] when nested
    shape: tuple  # (out_features, in_features)
    blocksize: int
    quant_type: str  # "nf4" or "fp4"
    dtype: torch.dtype  # the dtype the weight was quantized from
    nested_absmax: Optional[torch.Tensor] = None  # float32 [ceil(blocks / nested_blocksize)]
    nested_code: Optional[torch.Tensor] = None  # float32 [256]
    nested_offset: Optional[torch.Tensor] = None  # float32 [1]
    nested_blocksize: int = 256

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {self.blocksize}")
        if self.packed.dtype != torch.uint8:
            raise ValueError(f"packed must be uint8 (view other storage dtypes as uint8), got {self.packed.dtype}")
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(
                f"packed has {self.packed.numel()} bytes but shape {tuple(self.shape)} needs {(self.numel + 1) // 2}"
            )
        parts = (self.nested_absmax, self.nested_code, self.nested_offset)
        if any(p is None for p in parts) != all(p is None for p in parts):
            raise ValueError("nested_absmax, nested_code and nested_offset must be given together")

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized (bitsandbytes' compress_statistics)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(cls, weight: Any, quant_state: Any = None) -> "Quant4bitWeight":
        """Read a bitsandbytes 4-bit weight without copying it.

        ``weight`` is a ``bitsandbytes.nn.Params4bit``, a ``bitsandbytes.nn.Linear4bit`` (its
        ``.weight`` is used), or a packed tensor together with its ``quant_state``
        (``bitsandbytes.functional.QuantState``).
        """
        if quant_state is None:
            if hasattr(weight, "weight") and hasattr(weight.weight, "quant_state"):
                weight = weight.weight
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is None:
                raise ValueError(
                    "from_bnb: weight has no quant_state; quantize it first (move the Linear4bit to a "
                    "device) or pass quant_state="
                )
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "from_bnb: bitsandbytes repacked this weight for its AVX512-BF16 CPU kernel (an eval-mode CPU "
                "forward of the Linear4bit ran without grad): its nibble order and bfloat16 absmax are not the "
                "standard 4-bit format. Wrap the layer before running it in eval mode (fastpeft's layers switch "
                "the repack off, Linear4bit.support_avx512bf16_for_cpu = False), or reload the weights."
            )
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        packed = data.view(torch.uint8).reshape(-1)
        st = quant_state
        shape = tuple(int(s) for s in st.shape)
        if len(shape) != 2:
            raise ValueError(f"from_bnb: expected a 2-D weight, quant_state.shape is {shape}")
        nested = {}
        if getattr(st, "nested", False):
            offset = st.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor([float(offset)], dtype=torch.float32, device=packed.device)
            nested = dict(
                nested_absmax=st.state2.absmax.reshape(-1),
                nested_code=st.state2.code.reshape(-1),
                nested_offset=offset.reshape(1),
                nested_blocksize=int(st.state2.blocksize),
            )
        return cls(
            packed=packed,
            absmax=st.absmax.reshape(-1),
            shape=shape,
            blocksize=int(st.blocksize),
            quant_type=str(st.quant_type),
            dtype=st.dtype,
            **nested,
        )

    def op_args(self) -> tuple:
        """This weight as the frozen-weight argument of fastpeft's linear ops:
        ``(weight_format, weight_tensors, weight_ints)`` (see ``frozen_weight_args``)."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_code, self.nested_offset]
        return self.quant_type, tensors, [self.shape[0], self.shape[1], self.blocksize, self.nested_blocksize]

    def to(self, device) -> "Quant4bitWeight":
        """A copy of every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            nested_offset=move(self.nested_offset),
        )


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A frozen LLM.int8() weight in bitsandbytes' layout (``Linear8bitLt`` with
    ``has_fp16_weights=False``): ``W[o, k] = data[o, k] * scale[o] / 127``.

    fastpeft dequantizes it (into the shared workspace) as ``(data * scale) / 127`` in float32 and
    one rounding to the compute dtype: bit-exact with ``Int8Weight.dequantize_reference``. This is
    the weight bitsandbytes holds, not bitsandbytes' int8 matmul, which also quantizes the
    activations row-wise (and keeps outlier columns above ``threshold`` in 16-bit), so outputs
    differ from bitsandbytes' own forward by that activation quantization.
    """

    data: torch.Tensor  # int8 [out_features, in_features] (bitsandbytes' CB), the layer's own tensor
    scale: torch.Tensor  # float32 [out_features] (bitsandbytes' SCB, the per-row absmax)

    def __post_init__(self):
        if self.data.dtype != torch.int8:
            raise ValueError(f"Int8Weight: data must be int8 (bitsandbytes' CB), got {self.data.dtype}")
        if self.data.dim() != 2:
            raise ValueError(f"Int8Weight: data must be 2-D [out_features, in_features], got {tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32:
            raise ValueError(f"Int8Weight: scale must be float32 (bitsandbytes' SCB), got {self.scale.dtype}")
        if tuple(self.scale.shape) != (self.data.shape[0],):
            raise ValueError(
                f"Int8Weight: scale must be [{self.data.shape[0]}] (one per row of data), got {tuple(self.scale.shape)}"
            )
        if self.scale.device != self.data.device:
            raise ValueError(f"Int8Weight: scale is on {self.scale.device} but data is on {self.data.device}")

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def from_bnb(cls, layer: Any) -> "Int8Weight":
        """Read a ``bitsandbytes.nn.Linear8bitLt`` (or its ``Int8Params`` weight) without copying.

        bitsandbytes keeps the row scales in ``weight.SCB`` until the layer's first forward and in
        ``layer.state.SCB`` afterwards (``weight.SCB`` is then None); both are read. Layers with
        ``has_fp16_weights=True`` hold a 16/32-bit weight, not int8, and are refused.
        """
        weight = getattr(layer, "weight", layer)
        state = getattr(layer, "state", None)
        if state is not None and getattr(state, "has_fp16_weights", False):
            raise ValueError(
                "Int8Weight.from_bnb: this Linear8bitLt has has_fp16_weights=True, so its weight is not int8 "
                "(bitsandbytes trains it in 16/32 bit); load it with has_fp16_weights=False (the "
                "BitsAndBytesConfig(load_in_8bit=True) default) or use a plain nn.Linear"
            )
        if getattr(weight, "has_fp16_weights", False):
            raise ValueError("Int8Weight.from_bnb: the Int8Params has has_fp16_weights=True, so it is not int8")
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if data.dtype != torch.int8:
            raise ValueError(
                f"Int8Weight.from_bnb: the weight is {data.dtype}, not int8: quantize it first (move the "
                "Linear8bitLt to a device, as from_pretrained(load_in_8bit=True) does)"
            )
        scale = getattr(weight, "SCB", None)
        if scale is None and state is not None:
            scale = getattr(state, "SCB", None)
        if scale is None:
            raise ValueError("Int8Weight.from_bnb: no row scales (weight.SCB and layer.state.SCB are both None)")
        return cls(data=data, scale=scale)

    def dequantize_reference(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Plain PyTorch: ``(data.float() * scale[:, None]) / 127``, rounded once to ``dtype``."""
        return (self.data.float() * self.scale[:, None] / 127).to(dtype)

    def op_args(self) -> tuple:
        """This weight as the frozen-weight argument of fastpeft's linear ops:
        ``("int8", [data, scale], [])`` (see ``frozen_weight_args``)."""
        return "int8", [self.data, self.scale], []

    def to(self, device) -> "Int8Weight":
        """A copy of both tensors on ``device``."""
        return Int8Weight(data=self.data.to(device), scale=self.scale.to(device))


FrozenWeight = Union[torch.Tensor, Quant4bitWeight, Int8Weight]
"""A frozen base weight as fastpeft's linear ops take it: a dense [out, in] tensor, a
``Quant4bitWeight`` or an ``Int8Weight``."""


def weight_format(weight: FrozenWeight) -> str:
    """The format tag of a frozen weight: ``"dense"``, ``"nf4"``, ``"fp4"`` or ``"int8"``."""
    if isinstance(weight, torch.Tensor):
        return "dense"
    if isinstance(weight, (Quant4bitWeight, Int8Weight)):
        return weight.op_args()[0]
    raise TypeError(
        "a frozen weight is a torch.Tensor (dense), a fastpeft.quant.Quant4bitWeight or a "
        f"fastpeft.quant.Int8Weight, got {type(weight).__name__}"
    )


def frozen_weight_args(weights: Sequence[FrozenWeight], in_features: Optional[int] = None, name: str = "weights") -> tuple:
    """``(weight_format, weight_tensors, weight_ints)``: the frozen-weight argument every linear op
    of fastpeft takes (``torch.ops.fastpeft.lora_linear``, ``ia3_linear``, ``sparse_delta_linear``,
    ``multi_lora_linear``), for one or more weights of one format, weight after weight.

    Per weight: dense ``[weight]``; NF4/FP4 ``[packed, absmax, nested_absmax, nested_code,
    nested_offset]`` (None for the nested ones when not double-quantized) with ints
    ``[out_features, in_features, blocksize, nested_blocksize]``; int8 ``[data, scale]``. With
    ``in_features``, a quantized weight of another width raises ValueError naming it (``name[i]``;
    ``name`` alone for ops over one base weight, ``name="weight"``).
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one weight")
    formats = [weight_format(w) for w in weights]
    if len(set(formats)) != 1:
        raise TypeError(
            "the weights of one call must share a format (all torch.Tensor (dense), all "
            "fastpeft.quant.Quant4bitWeight of one quant_type, or all fastpeft.quant.Int8Weight), got "
            f"{formats}"
        )
    tensors, ints = [], []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor):
            tensors.append(w)
            continue
        if in_features is not None and (len(w.shape) != 2 or w.shape[1] != in_features):
            label = name if name == "weight" else f"{name}[{i}]"
            raise ValueError(f"{label} has shape {tuple(w.shape)} but x has {in_features} features")
        _, t, n = w.op_args()
        tensors += t
        ints += n
    return formats[0], tensors, ints


def frozen_weight_shapes(weight_format: str, weight_tensors: Sequence, weight_ints: Sequence[int]) -> list:
    """The (out_features, in_features) of each weight a frozen-weight argument describes (the fake
    kernels use it)."""
    if weight_format == "dense":
        return [tuple(int(s) for s in t.shape) for t in weight_tensors]
    if weight_format == "int8":
        return [tuple(int(s) for s in t.shape) for t in weight_tensors[0::2]]
    return [(int(weight_ints[i]), int(weight_ints[i + 1])) for i in range(0, len(weight_ints), 4)]


def release_workspace() -> None:
    """Free the calling thread's CPU buffer for dequantized weights.

    On CPU, fastpeft keeps one grow-only buffer per thread (sized to the largest dequantized
    weight) so layers do not page-fault a fresh allocation each step. On CUDA the caching
    allocator plays that role and there is nothing to free here.
    """
    _C.release_cpu_workspace()
