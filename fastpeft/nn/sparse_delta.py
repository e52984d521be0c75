"""SparseDeltaLinear: a frozen dense, 4-bit or int8 linear layer plus a trainable sparse delta."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from fastpeft.nn.base import cast, check_base_layer, compute_dtype, freeze, frozen_weight, kind_label, output_dtype
from fastpeft.ops.sparse_delta import dense_delta_reference, merged_weight, sparse_delta_linear
from fastpeft.optim.masks import Mask, index_dtype, validate_indices


class SparseDeltaLinear(nn.Module):
    """``forward(x) = x (W + D)^T + b``: a frozen ``torch.nn.Linear``, ``bitsandbytes.nn.Linear4bit``
    or int8 ``bitsandbytes.nn.Linear8bitLt`` base ``W`` plus a sparse delta ``D`` that is trained.

    ``D`` is zero except at ``indices`` (buffer; sorted unique flat indices into [out, in],
    int32 or int64) where it holds ``values`` (parameter, float32 by default, zeros at start).
    Forward adds the delta while the base weight is written into the shared workspace (dense
    copy, or 4-bit dequantization with the delta added before rounding), so no dense delta exists;
    backward computes the gradient of ``values`` at the indices only (a sampled product of the
    output gradient and x over the tokens), not a dense out x in weight gradient. Saved for
    backward: x, the indices and the values.

    dtypes as LoRALinear: the base layer's own rule (``fastpeft.nn.base.compute_dtype``). ``merge()`` returns a plain ``nn.Linear`` holding W + D.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        indices: torch.Tensor,
        values: Optional[torch.Tensor] = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base_kind = check_base_layer(base_layer, "SparseDeltaLinear")
        self.base_layer = base_layer
        freeze(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        device = base_layer.weight.device
        numel = self.in_features * self.out_features
        indices = validate_indices(indices, numel, "indices").to(device)
        self.register_buffer("indices", indices)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=dtype, device=device)
        elif values.shape != (indices.numel(),):
            raise ValueError(f"values must have shape ({indices.numel()},) like indices, got {tuple(values.shape)}")
        self.values = nn.Parameter(values.detach().to(device=device, dtype=dtype, copy=True))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's indices go to kernels that trust them: check them like the constructor.
        key = prefix + "indices"
        if key in state_dict:
            validate_indices(state_dict[key], self.in_features * self.out_features, key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def density(self) -> float:
        return self.indices.numel() / (self.in_features * self.out_features)

    @property
    def is_4bit(self) -> bool:
        """The base is a bitsandbytes 4-bit layer."""
        return self.base_kind == "4bit"

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return compute_dtype(self.base_layer, x, self.base_kind)

    def frozen_weight(self, dtype: torch.dtype):
        """The base weight as the op takes it: a dense tensor of ``dtype``, a Quant4bitWeight or an
        Int8Weight."""
        return frozen_weight(self.base_layer, self.base_kind, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + delta)^T + b``, the delta added while W is materialised (no dense delta tensor)."""
        dtype = self._compute_dtype(x)
        bias = self.base_layer.bias
        out = sparse_delta_linear(cast(x, dtype), self.frozen_weight(dtype), cast(bias, dtype), self.indices, self.values)
        return cast(out, output_dtype(x, dtype, self.base_kind))

    def delta_weight(self) -> torch.Tensor:
        """The dense float32 delta D (for inspection; the forward never builds it)."""
        return dense_delta_reference(self.indices, self.values.detach(), (self.out_features, self.in_features))

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W + D as a new dense tensor (default dtype: the base weight's, the dtype a 4-bit weight
        was quantized from, float32 for int8), rounded once after the float32 sum."""
        base = self.frozen_weight(self.base_layer.weight.dtype)  # the weight itself when dense
        return merged_weight(base, self.indices, self.values, dtype)

    @torch.no_grad()
    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + D and the base bias: the layer to deploy."""
        w = self.merged_weight(dtype)
        bias = self.base_layer.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias.to(w.dtype))
        return out

    def extra_repr(self) -> str:
        kind = kind_label(self.base_kind)
        return f"in={self.in_features}, out={self.out_features}, trained={self.indices.numel()}, base={kind}"


def apply_sparse_deltas(model: nn.Module, mask: Mask, dtype: torch.dtype = torch.float32) -> Dict[str, SparseDeltaLinear]:
    """Wrap every Linear / Linear4bit whose ``<name>.weight`` has indices in ``mask`` in a
    SparseDeltaLinear with those indices, in place. Returns the new layers by module name.

    With a mask computed on the dense model (e.g. fisher_mask) this trains the same entries on a
    4-bit copy of it. Entries of the mask that are not Linear weights are left to the caller.
    """
    replaced = {}
    for name, module in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if not isinstance(module, nn.Linear) or mask.get(key) is None:
            continue
        idx = mask[key]
        layer = SparseDeltaLinear(module, idx.to(index_dtype(module.in_features * module.out_features)), dtype=dtype)
        if not name:
            raise ValueError("apply_sparse_deltas cannot replace the model itself; wrap the layer directly")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced[name] = layer
    return replaced
