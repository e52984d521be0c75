"""Module targeting and replacement shared by the integrations: which modules a peft config adapts
(peft's own matching rules), whether fastpeft's layers can run on them, and swapping a module for
its wrapper and back."""

from __future__ import annotations

import copy

from torch import nn

from fastpeft.nn.base import base_layer_problem


def target_module_names(model: nn.Module, config) -> list:
    """Names of the modules peft would adapt, resolved with peft's own matching rules (target lists,
    regexes, ``"all-linear"``, ``exclude_modules``)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    names = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not names:
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}")
    return names


def check_fused_bases(modules: dict, method: str) -> None:
    """Raises NotImplementedError (before anything changes) naming every targeted module fastpeft's
    fused linear layers cannot run on, and why (see ``fastpeft.nn.base.base_layer_problem``)."""
    # A module of another type is named by its type; a bitsandbytes layer by what is wrong with it.
    unsupported = [f"{name} ({problem if isinstance(m, nn.Linear) else type(m).__name__})"
                   for name, m in modules.items() if (problem := base_layer_problem(m))]  # fmt: skip
    if unsupported:
        raise NotImplementedError(
            f"fastpeft {method} runs on torch.nn.Linear, bitsandbytes Linear4bit and int8 Linear8bitLt layers; "
            f"these targeted modules are not: {', '.join(unsupported)}. Narrow target_modules, or use peft for them."
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise ValueError("cannot replace the model itself; wrap the layer directly")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrapped_layers(model: nn.Module, layer_type: type) -> list:
    """(name, module) of every ``layer_type`` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, layer_type)]


def put_back_base_layers(model: nn.Module, layers: list) -> nn.Module:
    """Replace each wrapper of ``layers`` ((name, module) pairs) by its ``base_layer``."""
    for name, module in layers:
        replace_module(model, name, module.base_layer)
    return model
