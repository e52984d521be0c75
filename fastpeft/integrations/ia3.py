"""Put fastpeft (IA)^3 layers into a model the way peft's IA3Model would, from a peft IA3Config.

Module selection is peft's own: its target matching (``all-linear``, ``exclude_modules``), its
feed-forward test for each targeted module, and its per-model-type defaults when
``target_modules`` / ``feedforward_modules`` are None. Each targeted layer becomes an
``IA3Linear`` whose vector is named ``<module path>.ia3_l``, so checkpoints match peft's
(``base_model.model.<module path>.ia3_l``).
"""

from __future__ import annotations

from torch import nn

from fastpeft.integrations.registry import Injection, register_method
from fastpeft.integrations.targeting import (check_fused_bases, put_back_base_layers, replace_module,
                                             target_module_names, wrapped_layers)  # fmt: skip
from fastpeft.nn.ia3 import IA3Linear

# IA3Config fields (some only in other peft versions) fastpeft does not implement, with the value that means "off".
_UNSUPPORTED_OPTIONS = {
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "target_parameters": None,
}


def check_supported(config) -> None:
    """Raise NotImplementedError naming every IA3Config option fastpeft does not implement."""
    problems = [
        f"{name}={getattr(config, name)!r}"
        for name, off in _UNSUPPORTED_OPTIONS.items()
        if getattr(config, name, off) not in (off, None, False, {}, [])
    ]
    if problems:
        raise NotImplementedError(
            "fastpeft's (IA)^3 does not implement these IA3Config options: " + ", ".join(problems)
            + ". Use peft for them, or switch them off."
        )


def apply_model_type_defaults(model: nn.Module, config) -> None:
    """Fill ``target_modules`` / ``feedforward_modules`` left None with peft's defaults for the model
    type, in place (as peft's ``IA3Model._prepare_adapter_config`` does, so the saved config is peft's)."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for field, defaults in (("target_modules", TARGET_DEFAULTS), ("feedforward_modules", FEEDFORWARD_DEFAULTS)):
        if getattr(config, field) is None:
            if model_type not in defaults:
                raise ValueError(
                    f"IA3Config.{field} is None and peft has no default {field} for model type {model_type!r}; "
                    f"set {field} explicitly"
                )
            setattr(config, field, set(defaults[model_type]))


def is_feedforward(config, name: str) -> bool:
    """peft's own test: does ``feedforward_modules`` make the module ``name`` scale its input?"""
    from peft.tuners.ia3 import IA3Model

    return IA3Model._check_target_module_feedforward(config, name)


def inject_ia3(model: nn.Module, config) -> list:
    """Replace every targeted layer of ``model`` by an IA3Linear, in place; return their names.

    Fills ``config``'s None target / feed-forward modules with peft's model-type defaults. Raises
    (before changing any module) for unsupported options and for targeted modules that are not a
    torch.nn.Linear, a bitsandbytes Linear4bit or an int8 Linear8bitLt, naming each such module and why.
    """
    check_supported(config)
    apply_model_type_defaults(model, config)
    names = target_module_names(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    check_fused_bases(modules, "(IA)^3")
    for name, module in modules.items():
        layer = IA3Linear(module, is_feedforward=is_feedforward(config, name), init_ia3_weights=config.init_ia3_weights)
        replace_module(model, name, layer)
    return names


def ia3_parameter_names(model: nn.Module) -> list:
    """Names (relative to ``model``) of every (IA)^3 vector."""
    return [f"{name}.ia3_l" for name, module in model.named_modules() if isinstance(module, IA3Linear)]


def _layers(model: nn.Module) -> list:
    return wrapped_layers(model, IA3Linear)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every IA3Linear's vector into its dense base layer and put the base layer back in its place.

    Raises (before merging any layer) if a base layer is quantized (4-bit or int8): its weight cannot hold the scaled
    weight exactly; use ``unload`` there, or load the model dense to merge.
    """
    layers = _layers(model)
    quantized = [name for name, m in layers if m.base_kind != "dense"]
    if quantized:
        kinds = " and ".join(sorted({"4-bit" if m.base_kind == "4bit" else "int8" for _, m in layers if m.base_kind != "dense"}))
        raise NotImplementedError(
            f"merge_and_unload needs dense base layers; {len(quantized)} (IA)^3 layers have a {kinds} base "
            f"(e.g. {quantized[0]}). Nothing was merged. Use unload(), or load the model dense to merge."
        )
    for _, module in layers:
        module.merge()
    return put_back_base_layers(model, layers)


def unload_ia3(model: nn.Module) -> nn.Module:
    """Put every IA3Linear's base layer back in its place, dropping the vectors (no merge)."""
    return put_back_base_layers(model, _layers(model))


def _inject(model: nn.Module, config) -> Injection:
    inject_ia3(model, config)
    return Injection(
        parameter_names=ia3_parameter_names(model),
        unload=lambda: unload_ia3(model),
        merge_and_unload=lambda: merge_and_unload(model),
    )


register_method("IA3", _inject)
