"""Bottleneck adapter layers on fastpeft's fused op (Houlsby / Pfeiffer, MAD-X stacking)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastpeft.nn.rational import RATIONAL_INITS, fit_rational
from fastpeft.ops.adapter import ACTIVATIONS, RATIONAL_COEFFS, bottleneck_adapter


class BottleneckAdapter(nn.Module):
    """``forward(x, residual=None, adapter_ids=None) = res + scaling * up(act(down(LN?(x))))``.

    ``res`` is ``residual`` when given (the ``adapters`` library's SeqBn placement passes the
    sub-layer output there and the layer-normed sum as ``x``), else ``x`` (Houlsby's
    ``h + f(h)``). ``bottleneck_size`` is r (``hidden_size // reduction_factor`` in the adapters
    library); ``activation`` relu, gelu, silu/swish or rational (a learnable rational activation,
    adaptable adapters: a ``rational_coeffs`` [N, 10] parameter initialised to approximate
    ``rational_init``, see ``fastpeft.nn.rational``); ``ln_before`` adds a trainable layer norm on
    the adapter input; ``scaling`` is a constant factor.

    ``num_adapters=N`` holds a bank of N adapters: ``adapter_ids`` [B] picks each example's
    adapter, so one batch mixes tasks or languages. Parameters (banks, N first):
    ``down_weight`` [N, r, d], ``down_bias`` [N, r], ``up_weight`` [N, d, r], ``up_bias`` [N, d],
    and with ``ln_before`` ``ln_weight``, ``ln_bias`` [N, d]. Initialised as the adapters library's
    default ("bert": weights N(0, 0.02), biases 0; ``init_weights="zero_up"`` zeroes the up
    projection so the layer starts as the identity).

    One fused op (``fastpeft.ops.bottleneck_adapter``): the down bias and activation in one pass
    over [M, r], the residual and the up bias added by the up GEMM; backward keeps only the [M, r]
    pre-activation (and x).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        activation: str = "relu",
        ln_before: bool = False,
        scaling: float = 1.0,
        num_adapters: int = 1,
        init_weights: str = "bert",
        ln_eps: float = 1e-5,
        device=None,
        dtype: Optional[torch.dtype] = None,
        rational_init: str = "leaky_relu",
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("bottleneck_size", bottleneck_size), ("num_adapters", num_adapters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if init_weights not in ("bert", "zero_up"):
            raise ValueError(f"init_weights must be 'bert' or 'zero_up', got {init_weights!r}")
        if rational_init not in RATIONAL_INITS:
            raise ValueError(f"rational_init must be one of {sorted(RATIONAL_INITS)}, got {rational_init!r}")
        self.rational_init = rational_init
        self.hidden_size, self.bottleneck_size, self.num_adapters = hidden_size, bottleneck_size, num_adapters
        self.activation = activation
        self.scaling = float(scaling)
        self.ln_eps = float(ln_eps)
        opts = dict(device=device, dtype=dtype)
        N, r, d = num_adapters, bottleneck_size, hidden_size
        self.down_weight = nn.Parameter(torch.empty(N, r, d, **opts))
        self.down_bias = nn.Parameter(torch.empty(N, r, **opts))
        self.up_weight = nn.Parameter(torch.empty(N, d, r, **opts))
        self.up_bias = nn.Parameter(torch.empty(N, d, **opts))
        if ln_before:
            self.ln_weight = nn.Parameter(torch.empty(N, d, **opts))
            self.ln_bias = nn.Parameter(torch.empty(N, d, **opts))
        else:
            self.register_parameter("ln_weight", None)
            self.register_parameter("ln_bias", None)
        if activation == "rational":
            self.rational_coeffs = nn.Parameter(torch.empty(N, RATIONAL_COEFFS, **opts))
        else:
            self.register_parameter("rational_coeffs", None)
        self.reset_parameters(init_weights)

    @property
    def ln_before(self) -> bool:
        return self.ln_weight is not None

    def reset_parameters(self, init_weights: str = "bert") -> None:
        """Re-initialise the bank: "bert" draws N(0, 0.02) weights and zero biases (the adapters library's
        default), "zero_up" also zeroes the up-projection so the adapter starts as the identity."""
        with torch.no_grad():
            self.down_weight.normal_(0.0, 0.02)
            self.down_bias.zero_()
            if init_weights == "zero_up":
                self.up_weight.zero_()
            else:
                self.up_weight.normal_(0.0, 0.02)
            self.up_bias.zero_()
            if self.ln_before:
                self.ln_weight.fill_(1.0)
                self.ln_bias.zero_()
            if self.rational_coeffs is not None:
                self.rational_coeffs.copy_(fit_rational(self.rational_init).expand_as(self.rational_coeffs))

    def load_adapter(self, index: int, down: nn.Linear, up: nn.Linear, layer_norm: Optional[nn.LayerNorm] = None) -> None:
        """Copy one adapter (plain ``nn.Linear`` down/up and optional ``nn.LayerNorm``, e.g. the
        ``adapter_down`` / ``adapter_up`` modules of an adapters-library ``Adapter``) into bank entry ``index``."""
        with torch.no_grad():
            self.down_weight[index].copy_(down.weight)
            self.down_bias[index].copy_(down.bias)
            self.up_weight[index].copy_(up.weight)
            self.up_bias[index].copy_(up.bias)
            if layer_norm is not None:
                if not self.ln_before:
                    raise ValueError("this adapter has no layer norm (ln_before=False)")
                self.ln_weight[index].copy_(layer_norm.weight)
                self.ln_bias[index].copy_(layer_norm.bias)

    def stage_args(self, dtype: torch.dtype) -> dict:
        """This adapter's weights, cast to the compute dtype, as one stage of the fused op."""
        cast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731
        return dict(
            down_weight=cast(self.down_weight), down_bias=cast(self.down_bias), up_weight=cast(self.up_weight),
            up_bias=cast(self.up_bias), ln_weight=None if not self.ln_before else cast(self.ln_weight),
            ln_bias=None if not self.ln_before else cast(self.ln_bias), scaling=self.scaling,
            rational_coeffs=None if self.rational_coeffs is None else cast(self.rational_coeffs),
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, adapter_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``residual + up(act(down(ln(x)))) * scaling`` (residual defaults to x); ``adapter_ids`` [B]
        picks each example's adapter from the bank."""
        return _run_chain([self], x, residual, [adapter_ids])

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, activation={self.activation}, "
            f"ln_before={self.ln_before}, scaling={self.scaling:g}, num_adapters={self.num_adapters}"
        )


class BottleneckAdapterStack(nn.Module):
    """Stacked adapters in one fused call (MAD-X: a language adapter, then a task adapter).

    ``forward(x, residual=None, adapter_ids=None)``: the first adapter maps x (adding onto
    ``residual`` when given) and every next adapter maps the previous output h to
    ``h + adapter(h)``; ``adapter_ids`` holds one [B] index tensor (or None) per adapter, so the
    language and the task can differ per example. All adapters must share hidden size,
    activation and whether they have a layer norm. The adapters are held, not copied.
    """

    def __init__(self, adapters: Sequence[BottleneckAdapter]):
        super().__init__()
        adapters = list(adapters)
        if not adapters or not all(isinstance(a, BottleneckAdapter) for a in adapters):
            raise TypeError("BottleneckAdapterStack takes a non-empty list of BottleneckAdapter")
        for attr in ("hidden_size", "activation", "ln_before"):
            if len({getattr(a, attr) for a in adapters}) != 1:
                raise ValueError(f"stacked adapters must share {attr}")
        if len({a.ln_eps for a in adapters}) != 1:
            raise ValueError("stacked adapters must share ln_eps")
        self.adapters = nn.ModuleList(adapters)

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        adapter_ids: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """The adapters applied in order (each on the previous one's output) in one fused call;
        ``adapter_ids`` has one [B] index tensor (or None) per stacked bank."""
        ids = list(adapter_ids) if adapter_ids is not None else [None] * len(self.adapters)
        if len(ids) != len(self.adapters):
            raise ValueError(f"adapter_ids needs one entry (or None) per adapter: {len(ids)} for {len(self.adapters)}")
        return _run_chain(list(self.adapters), x, residual, ids)


def _run_chain(adapters, x, residual, ids):
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    stages = [a.stage_args(dtype) for a in adapters]
    first = adapters[0]
    ln = first.ln_before
    out = bottleneck_adapter(
        x.to(dtype),
        [s["down_weight"] for s in stages],
        [s["down_bias"] for s in stages],
        [s["up_weight"] for s in stages],
        [s["up_bias"] for s in stages],
        [s["scaling"] for s in stages],
        activation=first.activation,
        residual=None if residual is None else residual.to(dtype),
        ln_weight=[s["ln_weight"] for s in stages] if ln else None,
        ln_bias=[s["ln_bias"] for s in stages] if ln else None,
        adapter_ids=ids,
        ln_eps=first.ln_eps,
        rational_coeffs=[s["rational_coeffs"] for s in stages] if first.activation == "rational" else None,
    )
    return out
