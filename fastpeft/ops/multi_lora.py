"""Several LoRA adapters in one batch (multi-LoRA): each row names its adapter.

``out_m = x_m W^T + b + scalings[a] * (dropout_a(x_m) lora_A[a]^T) lora_B[a]^T`` with
``a = adapter_index`` of row m (an example or a token); index -1 means the base layer alone.

The op is ``torch.ops.fastpeft.multi_lora_linear``, over a frozen W of any format (dense,
bitsandbytes NF4/FP4 or int8; ``fastpeft.quant.frozen_weight_args``). The base GEMM runs once for
the whole batch; the low-rank parts run on one of three paths, chosen per call from host-known
facts (device, dtype, shapes, rows per adapter), accumulated into the base output:

- *segment*: GEMMs over the rows grouped by adapter (punica's SGMV; on the CPU one MKL GEMM per
  adapter's rows). Adapters are read where they are, through a table of pointers. Every dtype and
  shape; the CPU's path, and CUDA's for float32/float16.
- *grouped* (CUDA, bfloat16 on sm90/sm100, in/out features multiples of 8, >= 32 rows per adapter
  on average): rows gathered into a layout padded per adapter to 8 rows, the bank stacked per call
  (zero-padded to the largest rank), every GEMM one ``torch._grouped_mm`` (CUTLASS, tensor cores)
  with the offsets read on the device, rows scattered back with the scaling and dropout mask fused.
- *bgmv* (CUDA forward with <= 4 rows per adapter on average, i.e. decode): one row per block,
  16-byte loads of x and of the adapter rows it uses; its backward runs the segment kernels.

``FASTPEFT_MULTI_LORA_PATH=segment|grouped|bgmv`` forces a path (the tests run each; forcing
grouped where ``_grouped_mm`` has no device kernel runs ATen's per-group fallback, which reads the
offsets back to the host). The thresholds are design estimates until measured on a GPU
(``benchmarks/bench_multi_lora.py`` times the paths side by side).

The grouping is a ``MultiLoRAPlan`` made by ``plan_multi_lora`` (one sort on the device and one
host sync that validates the indices). Make it once per batch and pass it to every layer; passing
a plain index tensor makes a plan per call.

Saved for backward: x, the [M, r_max] shrink output (padded to the largest rank of the bank, since
the ragged size depends on device data the host never reads), and the plan (int32, M + 3 (N + 1)
entries, shared by every layer that uses it), with dropout the 8-byte seed, and references to the
adapters and the frozen weight. Not saved: the dequantized weight, dropout masks,
any copy of the base output. Gradients of the adapters are reduced over the rows that used each
adapter; an adapter no row used gets zeros, as rows of ``nn.Embedding`` that no token used do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fastpeft.ops.dropout import dropout_reference, new_seed
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import FrozenWeight, frozen_weight_args, frozen_weight_shapes

Weight = FrozenWeight


@dataclasses.dataclass(frozen=True)
class MultiLoRAPlan:
    """Rows of one batch grouped by adapter, on the device of the batch.

    ``sorted_rows`` (int32 [rows]) lists row ids adapter by adapter, rows with no adapter last;
    ``offsets`` (int32 [3, num_adapters + 1]) holds each adapter's segment start in
    ``sorted_rows``, the number of 64-row tiles before it (the CUDA segment kernels' work list), and
    its start in the grouped layout (segments padded to multiples of 8 rows: grouped-GEMM offsets).
    """

    sorted_rows: torch.Tensor
    offsets: torch.Tensor
    rows: int
    num_adapters: int


def plan_multi_lora(adapter_index: torch.Tensor, rows: int, num_adapters: int) -> MultiLoRAPlan:
    """Group ``rows`` rows by adapter. ``adapter_index`` (int32/int64, values in
    ``-1 .. num_adapters - 1``) has one entry per row or per group of consecutive rows (one per
    example of a [batch, seq, features] input). Raises if an index is out of range."""
    sorted_rows, offsets = torch.ops.fastpeft.multi_lora_plan(adapter_index, int(rows), int(num_adapters))
    return MultiLoRAPlan(sorted_rows, offsets, int(rows), int(num_adapters))


# ---- fake (meta) kernels -------------------------------------------------------------------------


@torch.library.register_fake("fastpeft::multi_lora_plan")
def _(adapter_index, rows, num_adapters):
    return (
        adapter_index.new_empty((rows,), dtype=torch.int32),
        adapter_index.new_empty((3, num_adapters + 1), dtype=torch.int32),
    )


def _fake_forward(x, lora_A, out_features):
    lead = tuple(x.shape[:-1])
    max_rank = max((a.shape[0] for a in lora_A), default=0)
    return x.new_empty((*lead, out_features)), x.new_empty((math.prod(lead), max_rank))


def _fake_adapter_grads(lora_A, lora_B, adapter_grads):
    grad_A = [a.new_empty(a.shape) if want else a.new_empty((0,)) for a, want in zip(lora_A, adapter_grads)]
    grad_B = [b.new_empty(b.shape) if want else b.new_empty((0,)) for b, want in zip(lora_B, adapter_grads)]
    return grad_A, grad_B


@torch.library.register_fake("fastpeft::multi_lora_linear")
def _(x, weight_format, weight_tensors, weight_ints, bias, lora_A, lora_B, scalings, dropout_p, seed, sorted_rows,
      offsets):  # fmt: skip
    ((out_features, _),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    return _fake_forward(x, lora_A, out_features)


@torch.library.register_fake("fastpeft::multi_lora_linear_backward")
def _(grad_out, x, shrink, weight_format, weight_tensors, weight_ints, lora_A, lora_B, scalings, dropout_p, seed,
      sorted_rows, offsets, output_mask, adapter_grads):  # fmt: skip
    ((out_features, in_features),) = frozen_weight_shapes(weight_format, weight_tensors, weight_ints)
    grad_A, grad_B = _fake_adapter_grads(lora_A, lora_B, adapter_grads)
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    grad_w = x.new_empty((out_features, in_features)) if output_mask[1] else x.new_empty((0,))
    grad_b = x.new_empty((out_features,)) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_A, grad_B, grad_w, grad_b


# ---- autograd ------------------------------------------------------------------------------------
# multi_lora_linear has a C++ autograd kernel (csrc/multi_lora/multi_lora_autograd.cpp):
# Python register_autograd would cost ~0.3 ms per layer and step.

# ---- public functions ----------------------------------------------------------------------------

AdapterIndex = Union[torch.Tensor, Sequence[int], MultiLoRAPlan]


def _per_adapter(values, n: int, name: str) -> list:
    if isinstance(values, (int, float)):
        return [float(values)] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per adapter ({n}), got {len(values)}")
    return values


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def as_plan(adapter_index: AdapterIndex, x: torch.Tensor, num_adapters: int) -> MultiLoRAPlan:
    """``adapter_index`` as a plan for x: a plan is checked against x, an index (tensor or list of
    ints, one per example or per token: its shape is a prefix of ``x.shape[:-1]``) is planned."""
    rows = _rows(x)
    if isinstance(adapter_index, MultiLoRAPlan):
        if adapter_index.rows != rows or adapter_index.num_adapters != num_adapters:
            raise ValueError(
                f"the plan was made for {adapter_index.rows} rows and {adapter_index.num_adapters} adapters, "
                f"but x has {rows} rows and {num_adapters} adapters are given"
            )
        return adapter_index
    if not isinstance(adapter_index, torch.Tensor):
        adapter_index = torch.as_tensor(adapter_index, dtype=torch.int64, device=x.device)
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index must be an int32 or int64 tensor, got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {x.device}; move it to x's device")
    lead = tuple(x.shape[:-1])
    if tuple(adapter_index.shape) != lead[: adapter_index.dim()]:
        raise ValueError(
            f"adapter_index has shape {tuple(adapter_index.shape)}; it must hold one index per example "
            f"(shape {lead[:1]}) or per token (shape {lead}) of x {tuple(x.shape)}"
        )
    return plan_multi_lora(adapter_index, rows, num_adapters)


def multi_lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: AdapterIndex,
    dropout_p: Union[float, Sequence[float]] = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A linear layer with a bank of LoRA adapters where each row of x names its adapter.

    ``weight`` is a dense [out, in] tensor, a ``fastpeft.quant.Quant4bitWeight`` or a
    ``fastpeft.quant.Int8Weight``; adapter i is
    ``lora_A[i]`` [r_i, in] and ``lora_B[i]`` [out, r_i] with ``scalings[i]`` (any ranks, mixed);
    every tensor in x's dtype (float32, float16, bfloat16) on x's device. ``adapter_index`` is a
    ``MultiLoRAPlan`` or an int tensor with one entry per example (shape [batch] for x
    [batch, ..., in]) or per token (x.shape[:-1]); -1 means the base layer alone. ``dropout_p``
    (one value, or one per adapter) drops x in the LoRA branch with a mask hashed from ``seed``
    and the element index, regenerated in backward. Gradients flow to x, every adapter (summed
    over the rows that used it), the bias, and a dense weight that requires grad.
    """
    lora_A, lora_B = list(lora_A), list(lora_B)
    n = len(lora_A)
    if len(lora_B) != n:
        raise ValueError(f"lora_A and lora_B must have one entry per adapter, got {n} and {len(lora_B)}")
    scalings = _per_adapter(scalings, n, "scalings")
    dropout = _per_adapter(dropout_p, n, "dropout_p")
    for i, p in enumerate(dropout):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p[{i}] must be in [0, 1), got {p}")
    seed = (new_seed() if seed is None else seed) if any(p > 0 for p in dropout) else None
    plan = as_plan(adapter_index, x, n)
    fmt, tensors, ints = frozen_weight_args([weight], x.shape[-1], name="weight")
    out, _ = torch.ops.fastpeft.multi_lora_linear(
        x, fmt, tensors, ints, bias, lora_A, lora_B, scalings, dropout, seed, plan.sorted_rows, plan.offsets
    )
    return out


def row_adapter_index(adapter_index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adapter of every row of ``x.reshape(-1, in)``, from an index per example or per token."""
    lead = tuple(x.shape[:-1])
    idx = adapter_index.reshape(tuple(adapter_index.shape) + (1,) * (len(lead) - adapter_index.dim()))
    return idx.expand(lead).reshape(-1)


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: torch.Tensor,
    dropout_p: Union[float, Sequence[float]] = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-PyTorch ``multi_lora_linear``: a Python loop over the adapters (autograd through
    ordinary ops), with the kernels' dropout mask (indexed over the rows of the whole batch)."""
    out = F.linear(x, dense_weight_reference(weight, x.dtype), bias)
    rows = math.prod(x.shape[:-1])  # not reshape(-1, K): ambiguous when K (or out_features) is 0
    x2 = x.reshape(rows, x.shape[-1])
    out2 = out.reshape(rows, out.shape[-1])
    rows_adapter = row_adapter_index(torch.as_tensor(adapter_index, device=x.device), x)
    dropout = _per_adapter(dropout_p, len(lora_A), "dropout_p")
    for a, (A, B, s, p) in enumerate(zip(lora_A, lora_B, _per_adapter(scalings, len(lora_A), "scalings"), dropout)):
        rows = (rows_adapter == a).nonzero().reshape(-1)
        if rows.numel() == 0:
            continue
        xa = (dropout_reference(x2, p, seed) if p > 0 else x2)[rows]
        out2 = out2.index_add(0, rows, s * F.linear(F.linear(xa, A), B))
    return out2.view(out.shape)
