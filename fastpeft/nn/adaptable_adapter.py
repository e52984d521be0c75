"""Adaptable adapters (Moosavi et al., NAACL 2022): a bottleneck adapter with a learnable rational
activation and a learned switch that decides whether the layer keeps its adapter.

``AdaptableAdapter`` is a ``BottleneckAdapter`` with ``activation="rational"`` (its coefficients are
trained, fused into the adapter op: ``fastpeft.ops.adapter``) and a switch: per adapter of the bank
two logits ``switch_logits[i] = (adapter, skip)``. In training each forward draws a Gumbel-softmax
sample ``g`` of them (temperature ``switch_temperature``; ``switch_hard``: the straight-through
one-hot sample) and returns ``res + g_adapter * (adapter(x) - res)``, the two branches mixed by the
sampled weight, so the logits learn which choice lowers the loss. In eval the switch is decided:
the adapter runs where ``logit_adapter >= logit_skip`` and is skipped (the layer returns ``res``)
elsewhere; ``prune`` (``fastpeft.integrations.adaptable_adapter``) then removes the adapters that
are switched off for good.

Cost of the switch in training: the mix is one ``torch.lerp`` over the [tokens, hidden] output
(autograd keeps res and the adapter output for the logits' gradient); a decided switch costs
nothing (the fused op alone, or no op when skipped).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.nn.adapter import BottleneckAdapter, _run_chain

SWITCH_ADAPTER, SWITCH_SKIP = 0, 1


def check_switch_temperature(value) -> float:
    """``value`` as a float when it is a positive finite number, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < float("inf")):
        raise ValueError(f"switch_temperature must be a positive number (the Gumbel-softmax temperature), got {value!r}")
    return float(value)


class AdaptableAdapter(BottleneckAdapter):
    """``BottleneckAdapter`` with a rational activation and a Gumbel-softmax layer switch.

    Arguments as ``BottleneckAdapter`` (``activation`` defaults to "rational"; another activation
    keeps the switch alone), plus ``switch_temperature`` (> 0), ``switch_hard`` (straight-through
    one-hot samples) and ``switch_decided`` (the switch no longer samples, also in training: after
    ``prune``; its logits stop training). Parameters: those of the adapter, ``rational_coeffs``
    [N, 10] and ``switch_logits`` [N, 2] (float32, zeros: both choices equally likely at first).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        activation: str = "rational",
        switch_temperature: float = 1.0,
        switch_hard: bool = False,
        switch_decided: bool = False,
        **kwargs,
    ):
        super().__init__(hidden_size, bottleneck_size, activation=activation, **kwargs)
        if not isinstance(switch_hard, bool):
            raise ValueError(f"switch_hard must be a bool, got {switch_hard!r}")
        self.switch_temperature = check_switch_temperature(switch_temperature)
        self.switch_hard = switch_hard
        device = self.down_weight.device
        self.switch_logits = nn.Parameter(torch.zeros(self.num_adapters, 2, device=device, dtype=torch.float32))
        self.switch_decided = False
        self._decision = None  # (logits version, keep mask, all on, all off): one host read per version
        if switch_decided:
            self.decide_switch()

    def set_switch_temperature(self, value: float) -> None:
        """Set the Gumbel-softmax temperature (e.g. annealed during training); must be > 0."""
        self.switch_temperature = check_switch_temperature(value)

    def keep_mask(self) -> torch.Tensor:
        """bool [N]: which adapters of the bank the decided switch keeps (logit_adapter >= logit_skip)."""
        logits = self.switch_logits.detach()
        return logits[:, SWITCH_ADAPTER] >= logits[:, SWITCH_SKIP]

    def decide_switch(self) -> None:
        """Stop sampling: from now on the switch is ``keep_mask()`` in training too, and its logits
        no longer train."""
        self.switch_decided = True
        self.switch_logits.requires_grad_(False)

    def _decided(self):
        """(keep mask, every entry on, every entry off) of the decided switch, read back to the host
        once per change of the logits (their version counter: optimizer steps and loads bump it),
        not on every eval forward."""
        version = self.switch_logits._version
        if self._decision is None or self._decision[0] != version:
            keep = self.keep_mask()
            self._decision = (version, keep, bool(keep.all()), bool((~keep).all()))
        return self._decision[1:]

    def switch_weights(self) -> torch.Tensor:
        """float32 [N]: the weight of the adapter branch per bank entry: a Gumbel-softmax sample in
        training (until the switch is decided), else ``keep_mask()`` as 0 / 1."""
        if self.training and not self.switch_decided:
            sample = F.gumbel_softmax(self.switch_logits, tau=self.switch_temperature, hard=self.switch_hard, dim=-1)
            return sample[:, SWITCH_ADAPTER]
        return self.keep_mask().to(torch.float32)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, adapter_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``res + g * (adapter(x) - res)`` with ``res = residual`` (default x) and ``g`` the switch
        weight of each example's adapter (``adapter_ids`` [B] picks it from the bank)."""
        res = x if residual is None else residual
        if self.training and not self.switch_decided:
            g = self.switch_weights()
        else:
            keep, all_on, all_off = self._decided()
            if all_off:
                return res  # every adapter of the bank is switched off: the layer is the identity
            if all_on:
                return _run_chain([self], x, residual, [adapter_ids])
            g = keep.to(torch.float32)
        out = _run_chain([self], x, residual, [adapter_ids])
        g = g[adapter_ids.to(g.device).long()] if adapter_ids is not None else g[:1].expand(out.shape[0])
        g = g.to(out.dtype).view(out.shape[0], *([1] * (out.dim() - 1)))
        return torch.lerp(res.to(out.dtype), out, g)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, switch_temperature={self.switch_temperature:g}, "
            f"switch_hard={self.switch_hard}, switch_decided={self.switch_decided}"
        )


def adaptable_adapter_reference(
    adapter: AdaptableAdapter,
    x: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    adapter_ids: Optional[torch.Tensor] = None,
    switch_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch ``AdaptableAdapter.forward``: the unfused adapter (``bottleneck_adapter_reference``,
    the rational as ``rational_reference``'s elementwise polynomials) and the switch mix
    ``lerp(res, adapter(x), g)`` with ``g = switch_weights`` [N] (default: the module's own draw)."""
    from fastpeft.ops.adapter import bottleneck_adapter_reference

    res = x if residual is None else residual
    g = adapter.switch_weights() if switch_weights is None else switch_weights
    s = adapter.stage_args(x.dtype)
    out = bottleneck_adapter_reference(
        x, [s["down_weight"]], [s["down_bias"]], [s["up_weight"]], [s["up_bias"]], [s["scaling"]],
        activation=adapter.activation, residual=residual,
        ln_weight=[s["ln_weight"]] if adapter.ln_before else None, ln_bias=[s["ln_bias"]] if adapter.ln_before else None,
        adapter_ids=[adapter_ids], ln_eps=adapter.ln_eps,
        rational_coeffs=[s["rational_coeffs"]] if adapter.activation == "rational" else None,
    )  # fmt: skip
    g = g[adapter_ids.to(g.device).long()] if adapter_ids is not None else g[:1].expand(out.shape[0])
    return torch.lerp(res, out, g.to(out.dtype).view(out.shape[0], *([1] * (out.dim() - 1))))


class AdaptableAdapterReference(AdaptableAdapter):
    """An ``AdaptableAdapter`` that runs ``adaptable_adapter_reference`` (the plain-PyTorch practice the
    fused layer replaces: tests and the main job's comparison run swap a module's class to it)."""

    def forward(self, x, residual=None, adapter_ids=None):
        return adaptable_adapter_reference(self, x, residual, adapter_ids)
