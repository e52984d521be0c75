"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) as one fused op.

``torch.ops.fastpeft.bottleneck_adapter`` runs a chain of adapter stages; stage ``i`` maps ``h`` to
``h + scaling_i * (act(LN_i(h) Wd_i^T + bd_i) Wu_i^T + bu_i)`` (the first stage adds onto
``residual`` when one is given, as the ``adapters`` library's SeqBn placement does). A chain of two
is MAD-X's language adapter followed by a task adapter. Every stage's weights are banks of ``N``
adapters, and ``adapter_ids`` [B] picks each example's adapter, so a batch can mix languages/tasks.

``activation="rational"`` is the learnable rational activation of adaptable adapters (Moosavi et
al. 2022): ``R(z) = (a0 + a1 z + ... + a5 z^5) / (1 + |b1 z| + |b2 z^2| + |b3 z^3| + |b4 z^4|)``
(the rational activations library's "version A", degrees (5, 4)), one coefficient row
``[a0..a5, b1..b4]`` per adapter of a bank (``rational_coeffs[i]`` [N, 10]); the coefficients get
gradients, reduced per bank entry in a fixed order (deterministic).

Fusion: the down-projection bias and activation run in one epilogue pass over the [M, r]
GEMM output; the up-projection GEMM reads the residual as its C operand (beta = 1) and adds its
bias through a ones column, so the output is written once. Saved for backward: per stage the
[M, r] pre-activation (the r-wide activation input), plus x (and the residual for a chain of two
or more); LN(h), act(z) and later stages' inputs are recomputed.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "swish", "rational")
RATIONAL_COEFFS = 10  # a0..a5 (numerator), b1..b4 (denominator)

# ---- fake kernels and autograd -------------------------------------------------------------------


@torch.library.register_fake("fastpeft::bottleneck_adapter")
def _(x, residual, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias, rational_coeffs, adapter_ids,
      scalings, activation, ln_eps):  # fmt: skip
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape), [x.new_empty((rows, w.shape[1])) for w in down_weight]


@torch.library.register_fake("fastpeft::bottleneck_adapter_backward")
def _(grad_out, x, residual, saved, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias, rational_coeffs,
      adapter_ids, scalings, activation, ln_eps, output_mask):  # fmt: skip
    need_x, need_res, need_adapter, need_ln, need_coeffs = output_mask
    like = lambda ts: [t.new_empty(t.shape) for t in ts]  # noqa: E731
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        x.new_empty(x.shape) if (need_res and residual is not None) else x.new_empty((0,)),
        like(down_weight) if need_adapter else [],
        like(down_bias) if need_adapter else [],
        like(up_weight) if need_adapter else [],
        like(up_bias) if need_adapter else [],
        like(ln_weight) if (need_ln and ln_weight) else [],
        like(ln_bias) if (need_ln and ln_weight) else [],
        like(rational_coeffs) if (need_coeffs and rational_coeffs) else [],
    )


# bottleneck_adapter has a C++ autograd kernel (csrc/adapter/adapter_autograd.cpp): Python
# register_autograd would cost ~0.3 ms per layer and step.

# ---- public functions ----------------------------------------------------------------------------


def _as_bank(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == dims else t


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: Sequence[torch.Tensor],
    down_bias: Sequence[torch.Tensor],
    up_weight: Sequence[torch.Tensor],
    up_bias: Sequence[torch.Tensor],
    scalings: Sequence[float],
    activation: str = "relu",
    residual: Optional[torch.Tensor] = None,
    ln_weight: Optional[Sequence[torch.Tensor]] = None,
    ln_bias: Optional[Sequence[torch.Tensor]] = None,
    adapter_ids: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ln_eps: float = 1e-5,
    rational_coeffs: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """A chain of bottleneck adapters in one fused op; returns the last stage's output.

    Stage ``i``: ``h <- res + scaling_i * (act(LN_i(h) Wd_i^T + bd_i) Wu_i^T + bu_i)`` with ``res = h``,
    except that the first stage adds onto ``residual`` when given (its input is then ``x``).
    Weights per stage: ``down_weight`` [r, d] or a bank [N, r, d], ``down_bias`` [r] / [N, r],
    ``up_weight`` [d, r] / [N, d, r], ``up_bias`` [d] / [N, d], optional layer norm ``ln_weight``,
    ``ln_bias`` [d] / [N, d] for every stage or none; ``adapter_ids[i]`` [B] picks each example's
    adapter from bank ``i`` (``None`` when N == 1). ``activation`` is relu, gelu (erf), silu
    (alias swish) or rational, which takes ``rational_coeffs`` (per stage [10] or a bank [N, 10]:
    ``a0..a5, b1..b4``, see the module docstring). All tensors in x's dtype and on x's device; x is
    [B, ..., d].
    Saves per stage the [M, r] pre-activation; everything wider is recomputed in backward.
    """
    n = len(down_weight)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if adapter_ids is None:
        adapter_ids = [None] * n
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together")
    if (activation == "rational") != (rational_coeffs is not None):
        raise ValueError("rational_coeffs must be given for activation='rational' and only then "
                         f"(activation={activation!r}, rational_coeffs {'given' if rational_coeffs is not None else 'None'})")  # fmt: skip
    ln_weight = [_as_bank(t, 1) for t in (ln_weight or [])]
    ln_bias = [_as_bank(t, 1) for t in (ln_bias or [])]
    coeffs = [_as_bank(t, 1) for t in (rational_coeffs or [])]
    out, _ = torch.ops.fastpeft.bottleneck_adapter(
        x, residual,
        [_as_bank(t, 2) for t in down_weight], [_as_bank(t, 1) for t in down_bias],
        [_as_bank(t, 2) for t in up_weight], [_as_bank(t, 1) for t in up_bias],
        ln_weight, ln_bias, coeffs, list(adapter_ids), [float(s) for s in scalings], activation, float(ln_eps),
    )  # fmt: skip
    return out


def rational_reference(z: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch rational activation: ``P(z) / (1 + sum_j |b_j z^j|)`` with ``coeffs`` [..., 10]
    (``a0..a5, b1..b4``) broadcast against ``z`` [..., r] over its last dimension."""
    c = [coeffs[..., i].unsqueeze(-1) for i in range(RATIONAL_COEFFS)]
    num = c[0] + sum(c[i] * z**i for i in range(1, 6))
    den = 1 + sum((c[5 + j] * z**j).abs() for j in range(1, 5))
    return num / den


def _activation_reference(name: str):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}[name]


def _per_example(t: torch.Tensor, ids: Optional[torch.Tensor], x: torch.Tensor, dims: int) -> torch.Tensor:
    """Bank entry of each example, shaped to broadcast against x [B, ..., d] (ids None: entry 0)."""
    t = _as_bank(t, dims)
    if ids is None:
        return t[0]
    g = t[ids.to(t.device).long()]  # [B, *entry]
    return g.view(g.shape[0], *([1] * (x.dim() - 2)), *g.shape[1:])


def bottleneck_adapter_reference(
    x, down_weight, down_bias, up_weight, up_bias, scalings, activation="relu", residual=None, ln_weight=None,
    ln_bias=None, adapter_ids=None, ln_eps=1e-5, rational_coeffs=None,
):  # fmt: skip
    """Plain-PyTorch ``bottleneck_adapter``: the unfused module, one example's adapter at a time."""
    n = len(down_weight)
    adapter_ids = adapter_ids or [None] * n
    h, res = x, (residual if residual is not None else x)
    for i in range(n):
        ids = adapter_ids[i]
        hn = h
        if ln_weight is not None:
            hn = F.layer_norm(h, (h.shape[-1],), eps=ln_eps)
            hn = hn * _per_example(ln_weight[i], ids, x, 1) + _per_example(ln_bias[i], ids, x, 1)
        if activation == "rational":
            coeffs = _per_example(rational_coeffs[i], ids, x, 1)
            act = functools.partial(rational_reference, coeffs=coeffs)
        else:
            act = _activation_reference(activation)
        Wd, bd = _per_example(down_weight[i], ids, x, 2), _per_example(down_bias[i], ids, x, 1)
        Wu, bu = _per_example(up_weight[i], ids, x, 2), _per_example(up_bias[i], ids, x, 1)
        if ids is None:
            z = F.linear(hn, Wd, bd)
            up = F.linear(act(z), Wu, bu)
        else:  # per-example weights: [B, S, d] @ [B, d, r]
            flat = lambda t: t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])  # noqa: E731
            bmm = lambda t, W: flat(t) @ W.reshape(W.shape[0], *W.shape[-2:]).transpose(1, 2)  # noqa: E731
            z = bmm(hn, Wd).view(*hn.shape[:-1], Wd.shape[-2]) + bd
            up = bmm(act(z), Wu).view(*h.shape[:-1], Wu.shape[-2]) + bu
        h = res + scalings[i] * up
        res = h
    return h
