"""A frozen linear layer with a bank of named LoRA adapters, where every example picks its adapter."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastpeft.nn.base import cast, check_base_layer, compute_dtype, freeze, frozen_weight, kind_label, output_dtype
from fastpeft.ops.multi_lora import MultiLoRAPlan, multi_lora_linear

# peft's adapter name for "this example uses no adapter" (peft's `adapter_names=[..., "__base__"]`).
BASE_ADAPTER = "__base__"


class MultiLoRALinear(nn.Module):
    """Several LoRA adapters around one frozen ``nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or int8
    ``bitsandbytes.nn.Linear8bitLt``.

    ``forward(x, adapter_index)`` computes, for each example (or token) of x, the base layer plus
    the adapter it names, in one fused op (``fastpeft.ops.multi_lora_linear``): the base GEMM once
    for the batch, then segment GEMMs over the rows grouped by adapter, accumulated in place. No
    Python loop over adapters, for inference and training alike; gradients of each adapter are
    summed over the examples that used it.

    ``adapter_index`` is one of: a ``MultiLoRAPlan`` (make it once per batch with
    ``fastpeft.ops.plan_multi_lora`` and pass it to every layer), an int tensor on x's device with one
    index per example ([batch]) or per token (x.shape[:-1]), indices into ``adapter_names`` with -1
    for the base layer alone, or a list of adapter names as peft's ``adapter_names`` (``"__base__"``
    or None for the base layer alone).

    Adapters are added and removed at any time (``add_adapter`` / ``remove_adapter``) without
    touching the base layer or the other adapters; indices follow ``adapter_names``, the order of
    addition. Parameters are named as in peft: ``lora_A.<name>.weight`` [r, in],
    ``lora_B.<name>.weight`` [out, r], initialised as peft does, float32 by default (``dtype``) and
    cast to the compute dtype in forward. For serving, keep them in the compute dtype: then forward
    casts nothing.
    """

    def __init__(self, base_layer: nn.Module, dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self.base_kind = check_base_layer(base_layer, "MultiLoRALinear")
        self.base_layer = base_layer
        freeze(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.adapter_dtype = dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.lora_dropout: dict = {}

    # ---- the bank ---------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list:
        """Adapter names in index order."""
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> int:
        """Add an adapter (peft's init: kaiming-uniform A, zero B) and return its index."""
        if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
            raise ValueError(f"adapter name must be a non-empty str without '.', other than {BASE_ADAPTER!r}; got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; remove_adapter({name!r}) first")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        device = self.base_layer.weight.device
        dtype = dtype or self.adapter_dtype
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init_lora_weights is not False:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        self.lora_A[name] = A
        self.lora_B[name] = B
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = float(lora_dropout)
        return len(self.lora_A) - 1

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter; the adapters after it move down one index."""
        if name not in self.lora_A:
            raise ValueError(f"no adapter named {name!r}; adapters: {self.adapter_names}")
        del self.lora_A[name]
        del self.lora_B[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]

    def index_of(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        """int64 indices of adapter names (``"__base__"`` or None: -1), e.g. peft's ``adapter_names``."""
        position = {n: i for i, n in enumerate(self.adapter_names)}
        out = []
        for n in names:
            if n is None or n == BASE_ADAPTER:
                out.append(-1)
            elif n in position:
                out.append(position[n])
            else:
                raise ValueError(f"no adapter named {n!r}; adapters: {self.adapter_names}")
        return torch.tensor(out, dtype=torch.int64, device=device)

    # ---- forward ----------------------------------------------------------------------------------

    @property
    def is_4bit(self) -> bool:
        """The base is a bitsandbytes 4-bit layer."""
        return self.base_kind == "4bit"

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return compute_dtype(self.base_layer, x, self.base_kind)

    def _frozen_weight(self, dtype: torch.dtype):
        return frozen_weight(self.base_layer, self.base_kind, dtype)

    def forward(self, x: torch.Tensor, adapter_index: Union[torch.Tensor, Sequence, MultiLoRAPlan]) -> torch.Tensor:
        """``base(x)`` plus, for every example, its adapter's LoRA update; ``adapter_index`` is a [B] tensor
        of indices (-1: none), a list of adapter names, or a plan from ``plan_multi_lora``."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"MultiLoRALinear: x must be [..., {self.in_features}], got {list(x.shape)}")
        if isinstance(adapter_index, (list, tuple)) and any(n is None or isinstance(n, str) for n in adapter_index):
            adapter_index = self.index_of(adapter_index, device=x.device)
        dtype = self._compute_dtype(x)
        names = self.adapter_names
        out = multi_lora_linear(
            cast(x, dtype),
            self._frozen_weight(dtype),
            cast(self.base_layer.bias, dtype),
            [cast(self.lora_A[n].weight, dtype) for n in names],
            [cast(self.lora_B[n].weight, dtype) for n in names],
            [self.scaling[n] for n in names],
            adapter_index,
            [self.lora_dropout[n] if self.training else 0.0 for n in names],
        )
        return cast(out, output_dtype(x, dtype, self.base_kind))

    def extra_repr(self) -> str:
        kind = kind_label(self.base_kind)
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g})" for n in self.adapter_names)
        return f"in={self.in_features}, out={self.out_features}, base={kind}, adapters=[{adapters}]"
