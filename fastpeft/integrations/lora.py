"""Put fastpeft LoRA layers into a model the way peft's LoraModel would, from a peft LoraConfig.

Module selection is peft's own (its target matching, ``all-linear``, ``exclude_modules``,
``rank_pattern`` / ``alpha_pattern``), so fastpeft adapts exactly the layers peft would, and the
adapter parameters end up with peft's names: ``<module path>.lora_A.weight`` and ``.lora_B.weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastpeft.integrations.registry import Injection, register_method
from fastpeft.integrations.targeting import (check_fused_bases, put_back_base_layers, replace_module,
                                             target_module_names, wrapped_layers)  # fmt: skip
from fastpeft.nn.lora import LoRALinear
from fastpeft.nn.lora_embedding import LoRAEmbedding, embedding_base_problem
from fastpeft.nn.trainable_tokens import TrainableTokensEmbedding, check_token_indices, trainable_tokens_base_problem

# LoraConfig fields fastpeft does not implement, with the value that means "off".
_UNSUPPORTED_OPTIONS = {
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}


# init_lora_weights values fastpeft's layers initialise themselves.
_OWN_INITS = (True, False, "gaussian")


def peft_init(config):
    """The ``init_lora_weights`` value when it is one of peft's data-free initialisations that
    fastpeft runs through peft's own code ("pissa", "pissa_niter_<K>", "olora", "loftq"), else None."""
    init = config.init_lora_weights
    if not isinstance(init, str):
        return None
    if init in ("pissa", "olora", "loftq"):
        return init
    prefix, _, niter = init.partition("_niter_")
    return init if prefix == "pissa" and niter.isdigit() else None


def check_supported(config, own_inits_only: bool = False) -> None:
    """Raises NotImplementedError naming every LoraConfig option fastpeft's LoRA does not implement
    (``own_inits_only``: also peft's PiSSA / OLoRA / LoftQ initialisations, for ``add_adapter``)."""
    problems = [
        f"{name}={getattr(config, name)!r}"
        for name, off in _UNSUPPORTED_OPTIONS.items()
        if getattr(config, name, off) not in (off, None, False, {}, [])
    ]
    if config.bias != "none":
        problems.append(f"bias={config.bias!r}")
    if own_inits_only and getattr(config, "use_dora", False):
        problems.append("use_dora=True in add_adapter (a DoRA adapter runs alone on its layers)")
    init = config.init_lora_weights
    if init == "eva":
        problems.append("init_lora_weights='eva' (a data-driven init: peft's initialize_lora_eva_weights needs "
                        "a dataloader and peft's model)")  # fmt: skip
    elif init not in _OWN_INITS and (own_inits_only or peft_init(config) is None):
        problems.append(f"init_lora_weights={init!r}")
    if problems:
        raise NotImplementedError(
            "fastpeft's LoRA does not implement these LoraConfig options: " + ", ".join(problems)
            + ". Use peft for them, or switch them off."
        )


def check_peft_init_bases(modules: dict, init: str) -> None:
    """Raises NotImplementedError (before anything changes) when a targeted base cannot take the
    peft initialisation ``init``: PiSSA and LoftQ need dense float bases (peft's ``pissa_init``
    refuses quantized weights; LoftQ quantizes a dense model itself), OLoRA runs on dense and 4-bit
    bases (peft dequantizes, writes the residual and re-quantizes) but not on int8 ones here."""
    from fastpeft.nn.base import base_kind

    if init == "loftq" and not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        raise NotImplementedError(
            "init_lora_weights='loftq': peft's loftq_init quantizes the weights on a CUDA (or XPU) device, and none is "
            "available; run the LoftQ init on a GPU machine"
        )
    allowed = ("dense", "4bit") if init == "olora" else ("dense",)
    bad = [f"{name} ({base_kind(m)})" for name, m in modules.items() if base_kind(m) not in allowed]
    if bad:
        what = "OLoRA" if init == "olora" else ("LoftQ" if init == "loftq" else "PiSSA")
        raise NotImplementedError(
            f"init_lora_weights={init!r}: fastpeft runs {what} on {' and '.join(allowed)} base layers only (it writes "
            f"the residual into the base weight); these targeted modules are not: {', '.join(bad)}. Load the model "
            "unquantized for the init, or use peft."
        )


def _peft_initialised_layers(model: nn.Module, config, names: list) -> dict:
    """Run peft's own LoRA injection (and so its ``pissa_init`` / ``olora_init`` / ``loftq_init``,
    which write the residual into the base weights) on ``model``; return name -> peft layer."""
    import peft

    config = copy.deepcopy(config)
    config.modules_to_save = None
    had_config = "peft_config" in model.__dict__
    peft.inject_adapter_in_model(config, model, adapter_name="default")
    if not had_config:
        model.__dict__.pop("peft_config", None)
    return {name: model.get_submodule(name) for name in names}


def _pattern_value(pattern: dict, name: str, default):
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(list(pattern), name)
    return pattern.get(key, default)


def trainable_token_targets(model: nn.Module, config, lora_targets) -> dict:
    """peft's ``trainable_token_indices`` resolved to {module name: token ids}, validated (raises
    before anything changes): a list means the input embedding (peft's default), a dict maps module
    names (matched by suffix, as peft's ``_set_trainable``) to ids. Each target is a plain frozen
    ``nn.Embedding`` that is not a LoRA target; tied input / output embeddings are not implemented."""
    spec = getattr(config, "trainable_token_indices", None)
    if not spec:
        return {}
    if isinstance(spec, dict):
        wanted = dict(spec)
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in model.named_modules() if m is embedding), "embed_tokens")
        wanted = {name: spec}
    for key in wanted:
        if key in (config.modules_to_save or []):
            raise ValueError(f"trainable_token_indices: {key!r} is also in modules_to_save (trained fully); use one or "
                             "the other, as peft requires")  # fmt: skip
    targets, problems = {}, []
    for key, ids in wanted.items():
        names = [n for n, _ in model.named_modules() if n and n.endswith(key)]
        if not names:
            raise ValueError(f"trainable_token_indices: no module of the model matches {key!r}")
        for name in names:
            module = model.get_submodule(name)
            problem = trainable_tokens_base_problem(module)
            if name in lora_targets:
                problem = "it is a LoRA target too (target_modules)"
            if problem is not None:
                problems.append(f"{name} ({problem})")
                continue
            targets[name] = check_token_indices(ids, module.num_embeddings)
    if not problems and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = head is not None and inp is not None and getattr(head, "weight", None) is inp.weight
        if tied and any(model.get_submodule(n) is inp for n in targets):
            problems.append("the input embedding, whose weight the LM head shares (tied weights: peft trains the "
                            "tokens in both; fastpeft does not implement that)")  # fmt: skip
    if problems:
        raise NotImplementedError("fastpeft's trainable tokens cannot wrap these modules: " + ", ".join(problems)
                                  + ". Use peft for them.")  # fmt: skip
    return targets


def inject_lora(model: nn.Module, config) -> list:
    """Replace every targeted layer of ``model`` by a LoRALinear (a LoRAEmbedding for an
    ``nn.Embedding``), in place; return their names.

    Raises (before changing anything) if a targeted module is not a torch.nn.Linear, a
    bitsandbytes Linear4bit or an int8 bitsandbytes Linear8bitLt, naming each such module and why.
    """
    check_supported(config)
    names = target_module_names(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    embeddings = {name: m for name, m in modules.items() if isinstance(m, nn.Embedding)}
    bad = [f"{name} ({problem})" for name, m in embeddings.items() if (problem := embedding_base_problem(m))]
    if embeddings and config.use_dora:
        bad += [f"{name} (use_dora=True: fastpeft's DoRA covers linear layers, not embeddings)" for name in embeddings]
    if bad:
        raise NotImplementedError(f"fastpeft's embedding LoRA cannot adapt these targeted modules: {', '.join(bad)}. "
                                  "Narrow target_modules, or use peft for them.")  # fmt: skip
    check_fused_bases({n: m for n, m in modules.items() if n not in embeddings}, "LoRA")
    token_targets = trainable_token_targets(model, config, modules)
    init = peft_init(config)
    if init is not None:
        check_peft_init_bases({n: m for n, m in modules.items() if n not in embeddings}, init)
        peft_layers = _peft_initialised_layers(model, config, names)
    for name, module in modules.items():
        r = _pattern_value(config.rank_pattern, name, config.r)
        alpha = _pattern_value(config.alpha_pattern, name, config.lora_alpha)
        if init is not None:  # peft's layer holds the (residual) base and the initialised factors
            peft_layer = peft_layers[name]
            module = peft_layer.base_layer
        if name in embeddings:
            layer = LoRAEmbedding(module, r=r, lora_alpha=alpha, use_rslora=config.use_rslora,
                                  init_lora_weights=config.init_lora_weights if init is None else False)  # fmt: skip
            if init is not None:
                with torch.no_grad():
                    layer.lora_embedding_A.copy_(peft_layer.lora_embedding_A["default"])
                    layer.lora_embedding_B.copy_(peft_layer.lora_embedding_B["default"])
            replace_module(model, name, layer)
            continue
        layer = LoRALinear(module, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                           init_lora_weights=config.init_lora_weights if init is None else False,
                           use_dora=config.use_dora)  # fmt: skip
        if init is not None:
            with torch.no_grad():
                layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
                layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
                if config.use_dora:  # peft's magnitude, computed after its init changed the base
                    layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
        replace_module(model, name, layer)
    for name, ids in token_targets.items():
        replace_module(model, name, TrainableTokensEmbedding(model.get_submodule(name), ids))
    return names


def lora_parameter_names(model: nn.Module) -> list:
    """Names (relative to ``model``) of every LoRA adapter parameter."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
            if module.use_dora:  # peft's checkpoint key for DoRA's magnitude (no ".weight", no adapter name)
                names.append(f"{name}.lora_magnitude_vector")
        elif isinstance(module, LoRAEmbedding):
            names += [f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"]
        elif isinstance(module, TrainableTokensEmbedding):
            names.append(f"{name}.token_adapter.trainable_tokens_delta")
    return names


def _replace_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    layers = wrapped_layers(model, (LoRALinear, LoRAEmbedding, TrainableTokensEmbedding))
    if merge:
        # Linear layers first: a quantized base raises there before any (embedding) weight changes.
        layers.sort(key=lambda item: not isinstance(item[1], LoRALinear))  # then embeddings, trainable tokens
        for _, module in layers:
            module.merge()  # raises for quantized bases before any layer is replaced
    return put_back_base_layers(model, layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear (and LoRAEmbedding) into its dense base layer and put the base layer back in its place."""
    return _replace_lora_layers(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's (and LoRAEmbedding's) base layer back in its place, dropping the adapter (no merge)."""
    return _replace_lora_layers(model, merge=False)


def saved_embedding_base_names(model: nn.Module, config) -> list:
    """Names of the frozen embedding weights peft's checkpoint also holds (its default
    ``save_embedding_layers="auto"``): when an ``EMBEDDING_LAYER_NAMES`` entry ("embed_tokens",
    "lm_head") is in ``target_modules``, the base weight of each targeted input / output embedding
    (``<module>.base_layer.weight``)."""
    from peft.utils.other import EMBEDDING_LAYER_NAMES

    targets = config.target_modules
    if not targets or not any(k in targets for k in EMBEDDING_LAYER_NAMES):
        return []
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return []
    layers = {id(m): n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}
    names = []
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None and id(layer) in layers and layers[id(layer)] + ".base_layer.weight" not in names:
            names.append(layers[id(layer)] + ".base_layer.weight")
    return names


def _inject(model: nn.Module, config) -> Injection:
    from fastpeft.integrations import checkpoint

    inject_lora(model, config)
    base_names = saved_embedding_base_names(model, config)
    injection = Injection(
        parameter_names=lora_parameter_names(model),
        unload=lambda: unload_lora(model),
        merge_and_unload=lambda: merge_and_unload(model),
    )
    if base_names:  # peft's checkpoint carries these embedding weights too; loading them is optional

        def state_dict() -> dict:
            params = dict(model.named_parameters())
            return {checkpoint.PEFT_PREFIX + n: params[n] for n in list(injection.parameter_names) + base_names}

        @torch.no_grad()
        def load_state_dict(tensors: dict) -> None:
            own = state_dict()
            optional = {checkpoint.PEFT_PREFIX + n for n in base_names}
            expected = {k: v for k, v in own.items() if k in tensors or k not in optional}
            checkpoint.check_tensors(tensors, expected, "the checkpoint")
            for key, value in tensors.items():
                expected[key].copy_(value.to(expected[key].dtype))

        injection.state_dict = state_dict
        injection.load_state_dict = load_state_dict
    return injection


register_method("LORA", _inject)
