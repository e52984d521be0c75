"""Put fastpeft LoRA layers into a model the way peft's LoraModel would, from a peft LoraConfig.

Module selection is peft's own (its target matching, ``all-linear``, ``exclude_modules``,
``rank_pattern`` / ``alpha_pattern``), so fastpeft adapts exactly the layers peft would, and the
adapter parameters end up with peft's names: ``<module path>.lora_A.weight`` and ``.lora_B.weight``.
"""

from __future__ import annotations

from torch import nn

from fastpeft.integrations.registry import Injection, register_method
from fastpeft.integrations.targeting import (check_fused_bases, put_back_base_layers, replace_module,
                                             target_module_names, wrapped_layers)  # fmt: skip
from fastpeft.nn.lora import LoRALinear

# LoraConfig fields fastpeft does not implement, with the value that means "off".
_UNSUPPORTED_OPTIONS = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}


def check_supported(config) -> None:
    problems = [
        f"{name}={getattr(config, name)!r}"
        for name, off in _UNSUPPORTED_OPTIONS.items()
        if getattr(config, name, off) not in (off, None, False, {}, [])
    ]
    if config.bias != "none":
        problems.append(f"bias={config.bias!r}")
    if config.init_lora_weights not in (True, False, "gaussian"):
        problems.append(f"init_lora_weights={config.init_lora_weights!r}")
    if problems:
        raise NotImplementedError(
            "fastpeft's LoRA does not implement these LoraConfig options: " + ", ".join(problems)
            + ". Use peft for them, or switch them off."
        )


def _pattern_value(pattern: dict, name: str, default):
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(list(pattern), name)
    return pattern.get(key, default)


def inject_lora(model: nn.Module, config) -> list:
    """Replace every targeted layer of ``model`` by a LoRALinear, in place; return their names.

    Raises (before changing anything) if a targeted module is not a torch.nn.Linear, a
    bitsandbytes Linear4bit or an int8 bitsandbytes Linear8bitLt, naming each such module and why.
    """
    check_supported(config)
    names = target_module_names(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    check_fused_bases(modules, "LoRA")
    for name, module in modules.items():
        r = _pattern_value(config.rank_pattern, name, config.r)
        alpha = _pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer = LoRALinear(module, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)  # fmt: skip
        replace_module(model, name, layer)
    return names


def lora_parameter_names(model: nn.Module) -> list:
    """Names (relative to ``model``) of every LoRA adapter parameter."""
    return [
        f"{name}.{part}.weight"
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
        for part in ("lora_A", "lora_B")
    ]


def _replace_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    layers = wrapped_layers(model, LoRALinear)
    if merge:
        for _, module in layers:
            module.merge()  # raises for quantized bases before any layer is replaced
    return put_back_base_layers(model, layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its dense base layer and put the base layer back in its place."""
    return _replace_lora_layers(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's base layer back in its place, dropping the adapter (no merge)."""
    return _replace_lora_layers(model, merge=False)


def _inject(model: nn.Module, config) -> Injection:
    inject_lora(model, config)
    return Injection(
        parameter_names=lora_parameter_names(model),
        unload=lambda: unload_lora(model),
        merge_and_unload=lambda: merge_and_unload(model),
    )


register_method("LORA", _inject)
