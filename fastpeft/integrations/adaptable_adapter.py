"""Adaptable adapters (Moosavi et al. 2022) through ``fastpeft.get_peft_model``.

    config = AdaptableAdapterConfig(reduction_factor=16, rational_init="leaky_relu", task_type="SEQ_CLS")
    model = fastpeft.get_peft_model(model, config)
    ...train...                                  # adapters, rational coefficients and switches train
    report = prune(model)                        # {"kept": [...], "removed": [...]} site names
    model.save_pretrained(path)                  # only the kept adapters; the config lists them

Placement, per-example banks (``adapter_index``) and the fused op are those of bottleneck adapters
(``fastpeft.integrations.adapter``): this config is a ``BottleneckAdapterConfig`` whose adapters
are ``fastpeft.nn.AdaptableAdapter`` (a learnable rational activation, fused into the adapter
kernel, and a Gumbel-softmax switch per adapter between "adapter" and "skip").

``prune(model)`` ends the search: every adapter whose switch is off (logit_adapter < logit_skip for
every entry of its bank) is removed, the kept ones stop sampling (their switch is fixed and no
longer trains), and ``config.kept_sites`` records the kept sites, so a checkpoint saved after
pruning holds only their tensors and ``fastpeft.from_pretrained`` rebuilds exactly that model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional


from fastpeft.integrations import adapter as _adapter
from fastpeft.integrations.adapter import ADAPTER_ATTRIBUTE, NON_LINEARITIES, BottleneckAdapterConfig
from fastpeft.integrations.registry import register_method
from fastpeft.nn.adaptable_adapter import AdaptableAdapter, check_switch_temperature
from fastpeft.nn.rational import RATIONAL_INITS

PEFT_TYPE = "FASTPEFT_ADAPTABLE_ADAPTER"


@dataclasses.dataclass
class AdaptableAdapterConfig(BottleneckAdapterConfig):
    """Adaptable adapters for ``fastpeft.get_peft_model``: ``BottleneckAdapterConfig``'s fields
    (placement, width, layer norm, banks ...) with these changes and additions:

    ``non_linearity``: "rational" (default: the learnable rational activation) or one of the fixed
    ones (then only the switch is learned). ``rational_init``: the function the rational starts as
    (leaky_relu, relu, gelu, silu, tanh). ``switch_temperature``: the Gumbel-softmax temperature
    (> 0; ``fastpeft.integrations.adaptable_adapter.set_switch_temperature`` anneals it).
    ``switch_hard``: straight-through one-hot samples instead of soft ones. ``kept_sites``: set by
    ``prune`` (the module names that keep an adapter); None: every site, switches still learning.
    """

    non_linearity: str = "rational"
    rational_init: str = "leaky_relu"
    switch_temperature: float = 1.0
    switch_hard: bool = False
    kept_sites: Optional[list] = None
    peft_type: str = PEFT_TYPE

    _PEFT_TYPE: ClassVar[str] = PEFT_TYPE
    _NON_LINEARITIES: ClassVar[tuple] = NON_LINEARITIES + ("rational",)

    def __post_init__(self):
        super().__post_init__()
        if self.rational_init not in RATIONAL_INITS:
            raise ValueError(f"rational_init must be one of {sorted(RATIONAL_INITS)}, got {self.rational_init!r}")
        self.switch_temperature = check_switch_temperature(self.switch_temperature)
        if not isinstance(self.switch_hard, bool):
            raise ValueError(f"switch_hard must be a bool, got {self.switch_hard!r}")
        if self.kept_sites is not None:
            if not isinstance(self.kept_sites, (list, tuple)) or not all(isinstance(n, str) for n in self.kept_sites):
                raise ValueError(f"kept_sites must be a list of module names (or None), got {self.kept_sites!r}")
            self.kept_sites = list(self.kept_sites)

    def select_sites(self, sites: list) -> list:
        """Every site, or after ``prune`` the ``kept_sites`` (each must be a site of this model)."""
        if self.kept_sites is None:
            return sites
        names = [name for name, *_ in sites]
        unknown = sorted(set(self.kept_sites) - set(names))
        if unknown:
            raise ValueError(f"kept_sites names modules that are not adapter sites of this model: {unknown}")
        keep = set(self.kept_sites)
        return [site for site in sites if site[0] in keep]

    def make_adapter(self, hidden: int, r: int, device, dtype) -> AdaptableAdapter:
        """The ``AdaptableAdapter`` of one site (switch already decided when the config is pruned)."""
        return AdaptableAdapter(hidden, r, **self.adapter_kwargs(), rational_init=self.rational_init,
                                switch_temperature=self.switch_temperature, switch_hard=self.switch_hard,
                                switch_decided=self.kept_sites is not None, device=device, dtype=dtype)  # fmt: skip


def _fast_model_parts(model):
    config = getattr(model, "active_peft_config", None)
    if not isinstance(config, AdaptableAdapterConfig):
        raise TypeError(f"expected a FastPeftModel made from an AdaptableAdapterConfig, got {type(model).__name__}"
                        + (f" with {type(config).__name__}" if config is not None else ""))  # fmt: skip
    return config, model.base_model.model


def adaptable_adapters(model) -> list:
    """[(site name, AdaptableAdapter)] of a FastPeftModel made from an ``AdaptableAdapterConfig``."""
    _, inner = _fast_model_parts(model)
    return [(name, getattr(m, ADAPTER_ATTRIBUTE)) for name, m in _adapter._adapted_modules(inner)]


def set_switch_temperature(model, value: float) -> None:
    """Set every switch's Gumbel-softmax temperature (> 0), e.g. once per epoch to anneal it."""
    value = check_switch_temperature(value)
    config, _ = _fast_model_parts(model)
    for _, a in adaptable_adapters(model):
        a.set_switch_temperature(value)
    config.switch_temperature = value


def prune(model) -> dict:
    """Remove the adapters whose switch is off and fix the rest; returns ``{"kept": [...], "removed":
    [...]}`` (site names in model order). The FastPeftModel's checkpoint then holds the kept adapters
    only, and its config's ``kept_sites`` lists them. Calling it again changes nothing."""
    config, inner = _fast_model_parts(model)
    kept, removed = [], []
    for name, module in _adapter._adapted_modules(inner):
        a: AdaptableAdapter = getattr(module, ADAPTER_ATTRIBUTE)
        if bool(a.keep_mask().any()):
            a.decide_switch()
            kept.append(name)
        else:
            _adapter.remove_adapter(module)
            removed.append(name)
    gone = tuple(f"{name}.{ADAPTER_ATTRIBUTE}." for name in removed)
    injection = model._injection
    injection.parameter_names = [n for n in injection.parameter_names if not n.startswith(gone)]
    config.kept_sites = kept
    return {"kept": kept, "removed": removed}


register_method(PEFT_TYPE, _adapter.inject, AdaptableAdapterConfig)
