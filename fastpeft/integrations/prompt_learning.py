"""Prompt learning through ``fastpeft.get_peft_model``: peft's ``PromptTuningConfig`` (prompt tuning),
``PromptEncoderConfig`` (P-tuning) and ``PrefixTuningConfig`` (prefix tuning / P-tuning v2).

* Prompt tuning and P-tuning: a ``SoftPrompt`` / ``PromptEncoder`` (``fastpeft.nn.soft_prompt``) is
  registered on the FastPeftModel as ``prompt_encoder["default"]`` (peft's name); the forward turns
  ``input_ids`` into embeddings, prepends the P virtual tokens and extends ``attention_mask`` (and, for
  causal LMs, ``labels``) as peft's ``PeftModelForCausalLM`` / ``PeftModelForSequenceClassification``
  do. ``generate()`` prepends the prompt at the prefill step (``prepare_inputs_for_generation`` is
  wrapped on the model instance, as peft does).
* Prefix tuning: a ``PrefixEncoder`` runs inside the model's attention through
  ``fastpeft.integrations.prefix_attention`` (registered as the model's ``fastpeft_prefix_encoder``);
  the forward is the model's own, ``generate()`` works unchanged.

Checkpoints are peft's: one tensor ``prompt_embeddings`` (plus ``base_model.<name>`` for
``modules_to_save``, e.g. a classifier). For P-tuning and for prefix tuning with
``prefix_projection=True`` peft saves the *output* of the reparameterising encoder, which cannot be
turned back into the encoder's weights. So, as in peft: a model built with ``inference_mode=True``
(what peft writes into saved configs and what ``fastpeft.from_pretrained`` therefore gets) holds that
output as a plain table and loads such checkpoints; a model with a trainable encoder saves them but
refuses to load them (``CheckpointError``, nothing changed).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from fastpeft.integrations.checkpoint import CheckpointError, check_tensors
from fastpeft.integrations.registry import Injection, register_method
from fastpeft.nn.prefix import PrefixEncoder
from fastpeft.nn.soft_prompt import IGNORE_INDEX, PromptEncoder, SoftPrompt, repeat_to_length

PROMPT_KEY = "prompt_embeddings"
PROMPT_PREFIX = "base_model."  # peft's key prefix for modules_to_save of prompt-learning models
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def _value(x):
    return getattr(x, "value", x)


def prepare_config(model: nn.Module, config) -> None:
    """Validate ``config`` for ``model`` and fill in what peft derives from the model config
    (``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``, ...),
    with peft's own rules, so saved configs read like peft's. Raises before anything changes."""
    from peft.utils.other import _prepare_prompt_learning_config

    peft_type = _value(config.peft_type)
    task = _value(getattr(config, "task_type", None))
    if task not in TASK_TYPES:
        raise NotImplementedError(
            f"fastpeft's {peft_type} supports task_type in {TASK_TYPES} (PeftModelForCausalLM / "
            f"PeftModelForSequenceClassification behaviour), got task_type={task!r}"
        )
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {config.num_virtual_tokens!r}")
    if config.num_transformer_submodules not in (None, 1):
        raise NotImplementedError(
            f"num_transformer_submodules={config.num_transformer_submodules}: fastpeft supports decoder-only and "
            "encoder-only models (1 submodule)"
        )
    if getattr(model, "get_input_embeddings", None) is None or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()): prompts need them")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters and peft_type != "PREFIX_TUNING":
        raise NotImplementedError(f"{type(model).__name__}.forward takes no inputs_embeds; {peft_type} needs it")
    _prepare_prompt_learning_config(config, model.config)
    config.num_transformer_submodules = 1
    if peft_type == "PROMPT_TUNING":
        init = _value(config.prompt_tuning_init)
        if init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise NotImplementedError(f"prompt_tuning_init={init!r}: fastpeft supports RANDOM, SAMPLE_VOCAB and TEXT")
        if init == "TEXT" and not (config.prompt_tuning_init_text and config.tokenizer_name_or_path):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
    elif peft_type == "P_TUNING":
        kind = _value(config.encoder_reparameterization_type)
        if kind not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}")
        if kind == "MLP" and config.encoder_num_layers != 2:
            raise ValueError(f"encoder_num_layers={config.encoder_num_layers}: the MLP encoder has exactly 2 hidden "
                             "layers (peft ignores this option for MLP); leave it at 2")  # fmt: skip
    elif peft_type == "PREFIX_TUNING":
        layers, kv_heads, head_dim = PrefixEncoder.layout_of(_text_config(model))
        if (config.num_layers, config.token_dim) != (layers, kv_heads * head_dim):
            raise ValueError(
                f"PrefixTuningConfig has num_layers={config.num_layers}, token_dim={config.token_dim}, but the model's "
                f"attention needs num_layers={layers}, token_dim={kv_heads * head_dim} (kv heads x head dim); leave "
                "them unset"
            )
        if config.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {config.init_weights!r}")


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _text_init_ids(config) -> list:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as peft: never run tokenizer code from the hub
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    return repeat_to_length(tokenizer(config.prompt_tuning_init_text)["input_ids"], config.num_virtual_tokens)


def build_prompt_module(model: nn.Module, config) -> nn.Module:
    """The module holding the prompt: SoftPrompt (prompt tuning, or any method with
    ``inference_mode=True``: a table of the encoder's output), PromptEncoder (P-tuning) or
    PrefixEncoder (prefix tuning). fp32 on the embeddings' device, as peft."""
    peft_type, P = _value(config.peft_type), config.num_virtual_tokens
    device = model.get_input_embeddings().weight.device
    if peft_type == "PREFIX_TUNING":
        layout = PrefixEncoder.layout_of(_text_config(model))
        init = "zero" if config.init_weights == "zero" else "random"
        projection = bool(config.prefix_projection) and not config.inference_mode
        return PrefixEncoder(*layout, P, prefix_projection=projection, token_dim=config.token_dim,
                             encoder_hidden_size=config.encoder_hidden_size, init=init, device=device)  # fmt: skip
    if peft_type == "P_TUNING" and not config.inference_mode:
        return PromptEncoder(P, config.token_dim, encoder_hidden_size=config.encoder_hidden_size,
                             encoder_type=_value(config.encoder_reparameterization_type).lower(),
                             encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout,
                             device=device)  # fmt: skip
    init = _value(getattr(config, "prompt_tuning_init", "RANDOM")) if not config.inference_mode else "RANDOM"
    words = model.get_input_embeddings()
    if init == "TEXT":
        ids = _text_init_ids(config)
        return SoftPrompt(P, config.token_dim, init="text", word_embeddings=words, init_token_ids=ids, device=device)
    return SoftPrompt(P, config.token_dim, init="vocab" if init == "SAMPLE_VOCAB" else "random", word_embeddings=words,
                      device=device)  # fmt: skip


def saved_prompt(module: nn.Module) -> torch.Tensor:
    """peft's ``prompt_embeddings``: the table itself, or the encoder's output (detached)."""
    if isinstance(module, PromptEncoder):
        training = module.training
        module.eval()  # the LSTM's dropout must not leak into the saved prompt
        try:
            with torch.no_grad():
                return module.prompts()[0]
        finally:
            module.train(training)
    if isinstance(module, PrefixEncoder) and module.prefix_projection:
        return module.transform(module.embedding.weight).detach()
    return module.embedding.weight


def _checkpoint_api(model: nn.Module, module: nn.Module, config, injection: Injection):
    """``state_dict`` / ``load_state_dict`` for the Injection (peft's keys)."""

    own = {id(p) for p in module.parameters()}

    def extra_params() -> dict:  # modules_to_save, appended to parameter_names by get_peft_model
        params = dict(model.named_parameters())
        names = [n for n in injection.parameter_names if n in params and id(params[n]) not in own]
        return {PROMPT_PREFIX + n: params[n] for n in names}

    def state_dict() -> dict:
        return {PROMPT_KEY: saved_prompt(module), **extra_params()}

    @torch.no_grad()
    def load_state_dict(tensors: dict) -> None:
        expected = state_dict()
        check_tensors(tensors, expected, "the given checkpoint")
        if expected[PROMPT_KEY] is not module.embedding.weight:
            raise CheckpointError(
                f"{_value(config.peft_type)} checkpoints hold the output of the reparameterising encoder "
                "(peft's prompt_embeddings), which cannot be loaded back into the encoder's weights. Build the "
                "model with inference_mode=True (as peft.PeftModel.from_pretrained and fastpeft.from_pretrained do "
                "for saved configs) to use it as a fixed prompt table"
            )
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].dtype))

    return state_dict, load_state_dict


# ---- prompt tuning / P-tuning: forward and generate ---------------------------------------------------


def _bind(model: nn.Module, args, kwargs) -> dict:
    """Positional arguments named by the model's forward signature; **kwargs flattened back."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(model.forward)
    out = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward got extra positional arguments: pass them by keyword")
        else:
            out[name] = value
    return out


def _prompt_forward(module: nn.Module, config):
    causal = _value(config.task_type) == "CAUSAL_LM"

    def forward(model: nn.Module, *args, **kwargs):
        kw = _bind(model, args, kwargs)
        input_ids, inputs_embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        B, P = inputs_embeds.shape[0], config.num_virtual_tokens
        if kw.get("position_ids") is not None:  # as peft: the virtual tokens would need positions too
            warnings.warn("position_ids are not supported with prompt learning; ignoring them (as peft does)")
            kw["position_ids"] = None
        if kw.get("token_type_ids") is not None:
            if causal:
                warnings.warn("token_type_ids are not supported with prompt learning; ignoring them (as peft does)")
                kw["token_type_ids"] = None
            else:  # SEQ_CLS: the virtual tokens are segment 0, as in peft
                t = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([t.new_zeros((B, P)), t], dim=1)
        if kw.get("attention_mask") is not None:
            mask = kw["attention_mask"]
            kw["attention_mask"] = torch.cat([mask.new_ones((B, P)), mask], dim=1)
        if causal and kw.get("labels") is not None:
            labels = kw["labels"]
            kw["labels"] = torch.cat([labels.new_full((B, P), IGNORE_INDEX), labels], dim=1)
        prompts = module.prompts()[0].to(inputs_embeds.dtype).expand(B, -1, -1)
        return model(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1), **kw)

    return forward


def _install_generation(model: nn.Module, module: nn.Module, config):
    """Wrap ``model.prepare_inputs_for_generation`` (on the instance, as peft does): at the prefill
    step the prompt is prepended to the embeddings; every step sees the mask extended by P ones.
    Returns the function that undoes it."""
    original = model.prepare_inputs_for_generation
    P = config.num_virtual_tokens

    def prepare_inputs_for_generation(*args, **kwargs):
        from transformers import Cache

        inputs = original(*args, **kwargs)
        cache = inputs.get("past_key_values")
        ids = inputs.get("input_ids")
        if cache is not None and ids is not None:
            seen = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
            if seen >= ids.shape[1]:  # the cache is P longer than the ids: decode the last token only
                inputs["input_ids"] = ids = ids[:, -1:]
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            inputs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], P)), mask], dim=1)
        elif mask is not None:
            raise NotImplementedError("generate() with prompt learning takes 2D attention masks only")
        # The model derives positions from the (longer) embeddings and cache, as with peft.
        inputs.pop("position_ids", None)
        inputs.pop("cache_position", None)
        if cache is None or (isinstance(cache, Cache) and not cache.get_seq_length()):
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)
            prompts = module.prompts()[0].to(embeds.dtype).expand(embeds.shape[0], -1, -1)
            inputs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
            inputs["input_ids"] = None
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs_for_generation

    def remove():
        if model.__dict__.get("prepare_inputs_for_generation") is prepare_inputs_for_generation:
            del model.prepare_inputs_for_generation

    return remove


# ---- the injector ----------------------------------------------------------------------------------------


def inject_prompt_learning(model: nn.Module, config) -> Injection:
    """Injector for PROMPT_TUNING, P_TUNING and PREFIX_TUNING configs (see the module docstring)."""
    prepare_config(model, config)
    peft_type = _value(config.peft_type)
    if peft_type == "PREFIX_TUNING":
        from fastpeft.integrations.prefix_attention import apply_prefix_tuning, check_supported_model

        check_supported_model(model)
    module = build_prompt_module(model, config)
    if peft_type == "PREFIX_TUNING":
        prefix_patch = apply_prefix_tuning(model, module)  # registers module as model.fastpeft_prefix_encoder
        names = [f"fastpeft_prefix_encoder.{n}" for n, _ in module.named_parameters()]

        def unload():
            prefix_patch.remove()
            return model

        injection = Injection(parameter_names=names, unload=unload)
    else:
        remove = _install_generation(model, module, config) if _value(config.task_type) == "CAUSAL_LM" else None

        def unload():
            if remove is not None:
                remove()
            return model

        injection = Injection(
            parameter_names=[],
            unload=unload,
            forward=_prompt_forward(module, config),
            owned_modules={"prompt_encoder": nn.ModuleDict({"default": module})},
        )
    for p in module.parameters():
        p.requires_grad_(True)
    injection.state_dict, injection.load_state_dict = _checkpoint_api(model, module, config, injection)
    return injection


for _peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
    register_method(_peft_type, inject_prompt_learning)

__all__ = ["build_prompt_module", "inject_prompt_learning", "prepare_config", "saved_prompt"]
