"""(IA)^3 layer on fastpeft's fused op: a drop-in for peft's ``ia3.Linear`` / ``ia3.Linear4bit``, also on
bitsandbytes int8 bases."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastpeft.nn.base import base_kind, cast, check_base_layer, compute_dtype, freeze, frozen_weight, kind_label
from fastpeft.nn.base import frozen_base, output_dtype
from fastpeft.ops.ia3 import ia3_linear


def fused_ia3_forward(
    base_layer: nn.Module,
    vectors: torch.Tensor,
    is_feedforward: bool,
    x: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    kind: Optional[str] = None,
) -> torch.Tensor:
    """``base_layer(x) * l`` (or ``base_layer(x * l)`` with ``is_feedforward``) through the fused op.

    ``base_layer`` is a frozen ``torch.nn.Linear``, bitsandbytes ``Linear4bit`` or int8
    ``Linear8bitLt`` (``kind``: its ``fastpeft.nn.base.base_kind``, detected when None); ``vectors``
    a bank [T, features] (any shape with one row of features when ``task_ids`` is None: peft's
    (out, 1) and (1, in) vectors are flattened). dtypes follow the base layer's rule
    (``fastpeft.nn.base.compute_dtype``). Differentiable in x and the vectors (a view or product of
    parameters keeps its graph).
    """
    kind = kind or base_kind(base_layer)
    if task_ids is None:
        vectors = vectors.reshape(1, -1)
    dtype = compute_dtype(base_layer, x, kind)
    if vectors.dtype not in (torch.float32, dtype):
        vectors = vectors.to(dtype)
    weight = frozen_weight(base_layer, kind, dtype)
    out = ia3_linear(cast(x, dtype), weight, cast(base_layer.bias, dtype), vectors, task_ids, is_feedforward)
    return cast(out, output_dtype(x, dtype, kind))


class IA3Linear(nn.Module):
    """(IA)^3 around a frozen ``torch.nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or int8
    ``bitsandbytes.nn.Linear8bitLt``.

    ``is_feedforward=False`` (keys, values): ``forward(x) = base_layer(x) * l``.
    ``is_feedforward=True`` (the FFN down-projection): ``forward(x) = base_layer(x * l)``.

    The parameter is named ``ia3_l`` as in HF peft and initialised to ones. With ``num_tasks=None``
    it has peft's shape ((out_features, 1), or (1, in_features) for feed-forward), so a peft state
    dict loads as is. With ``num_tasks=T`` it is a bank [T, features]; then
    ``forward(x, task_ids)`` scales every example ``b`` of ``x`` [B, ..., in] by its own task's
    vector ``ia3_l[task_ids[b]]`` in one launch, and backward reduces each task's gradient.

    Runs ``fastpeft.ops.ia3_linear``: on a 4-bit base with one task the vector is folded into
    the dequantization; otherwise the GEMM output is scaled in place (output side) or x is scaled
    into the GEMM (feed-forward). Backward keeps the output (output side) or x (feed-forward).
    The vector stays float32 by default (peft's dtype) and the product is taken in float32.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        is_feedforward: bool,
        num_tasks: Optional[int] = None,
        init_ia3_weights: bool = True,
        dtype: Optional[torch.dtype] = torch.float32,
    ):
        super().__init__()
        self.base_kind = check_base_layer(base_layer, "IA3Linear")
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"num_tasks must be None or an int >= 1, got {num_tasks!r}")
        self.base_layer = base_layer
        freeze(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.is_feedforward = bool(is_feedforward)
        self.num_tasks = num_tasks
        features = self.in_features if self.is_feedforward else self.out_features
        if num_tasks is None:
            shape = (1, features) if self.is_feedforward else (features, 1)
        else:
            shape = (num_tasks, features)
        device = base_layer.weight.device
        self.ia3_l = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        if init_ia3_weights:
            self.reset_ia3_parameters()
        self.merged = False

    def reset_ia3_parameters(self) -> None:
        """peft's init: every vector is ones (the layer starts as the base layer)."""
        nn.init.ones_(self.ia3_l)

    @property
    def vectors(self) -> torch.Tensor:
        """The vectors as a bank [T, features] (a view of ``ia3_l``)."""
        return self.ia3_l if self.num_tasks is not None else self.ia3_l.reshape(1, -1)

    @classmethod
    def from_peft(cls, peft_layer: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> "IA3Linear":
        """Wrap a peft ``ia3.Linear`` / ``ia3.Linear4bit``'s base layer with its vectors.

        One adapter name (default: the active one) gives a single-task layer with peft's shape;
        several names give a bank with one task per name, in order (task i = adapter_names[i]).
        The base layer is shared, the vectors are copied.
        """
        names = list(adapter_names) if adapter_names is not None else list(peft_layer.active_adapters)
        vecs = [peft_layer.ia3_l[n].detach() for n in names]
        multi = len(names) > 1
        layer = cls(peft_layer.get_base_layer(), peft_layer.is_feedforward, num_tasks=len(names) if multi else None,
                    dtype=vecs[0].dtype)  # fmt: skip
        with torch.no_grad():
            if multi:
                layer.ia3_l.copy_(torch.stack([v.flatten() for v in vecs]))
            else:
                layer.ia3_l.copy_(vecs[0])
        return layer

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``base(x) * l`` (or ``base(x * l)`` for feed-forward); with a bank, ``task_ids`` [B] picks each
        example's vector."""
        if self.merged:
            return self.base_layer(x)
        if self.num_tasks is not None and self.num_tasks > 1 and task_ids is None:
            raise ValueError(f"this layer holds {self.num_tasks} task vectors: pass task_ids ([batch] task per example)")
        # frozen_base: FSDP1 hands the frozen base in as views that require grad.
        return fused_ia3_forward(frozen_base(self.base_layer), self.vectors, self.is_feedforward, x, task_ids,
                                 self.base_kind)  # fmt: skip

    # ---- merge -----------------------------------------------------------------------------------

    @property
    def is_4bit(self) -> bool:
        """The base is a bitsandbytes 4-bit layer."""
        return self.base_kind == "4bit"

    def _single_vector(self) -> torch.Tensor:
        if self.num_tasks not in (None, 1):
            raise ValueError("merge() folds one task's vector into the weight; this layer holds a bank of tasks")
        return self.ia3_l.detach().reshape(-1).float()

    def merge(self) -> None:
        """Fold the vector into a dense base (rows of W and the bias, or columns of W for feed-forward);
        forward then runs the base layer alone."""
        if self.base_kind != "dense":
            raise NotImplementedError(
                f"merge() needs a dense base layer: a {kind_label(self.base_kind)} weight cannot hold the scaled weight exactly"
            )
        if self.merged:
            return
        l = self._single_vector()
        with torch.no_grad():
            w, b = self.base_layer.weight, self.base_layer.bias
            if self.is_feedforward:
                w.copy_((w.float() * l).to(w.dtype))
            else:
                w.copy_((w.float() * l[:, None]).to(w.dtype))
                if b is not None:
                    b.copy_((b.float() * l).to(b.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Divide the vector out of the base weight again (exact up to the weight dtype's rounding;
        like peft, a vector entry of 0 cannot be undone)."""
        if not self.merged:
            return
        l = self._single_vector()
        if bool((l == 0).any()):
            raise ValueError("cannot unmerge: the (IA)^3 vector has zero entries, so the scaled weight lost information")
        with torch.no_grad():
            w, b = self.base_layer.weight, self.base_layer.bias
            if self.is_feedforward:
                w.copy_((w.float() / l).to(w.dtype))
            else:
                w.copy_((w.float() / l[:, None]).to(w.dtype))
                if b is not None:
                    b.copy_((b.float() / l).to(b.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = kind_label(self.base_kind)
        side = "feedforward (input)" if self.is_feedforward else "output"
        return f"{side}, num_tasks={self.num_tasks}, base={kind}"
