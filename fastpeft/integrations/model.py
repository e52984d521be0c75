"""``fastpeft.get_peft_model``: put fused fastpeft layers into a HF transformers model from a peft config.

The returned ``FastPeftModel`` is laid out like peft's ``PeftModel`` (``model.base_model.model`` is
the adapted transformers model), so adapter parameters are named exactly as peft saves them and
checkpoints are interchangeable with peft's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from typing import Optional

import torch
from torch import nn

from fastpeft.integrations import adapters as _adapters
from fastpeft.integrations import checkpoint
from fastpeft.integrations import fused_loss as _fused_loss
from fastpeft.integrations import lora as _lora  # noqa: F401  (registers the method)
from fastpeft.integrations import adapter as _adapter  # noqa: F401  (registers the method)
from fastpeft.integrations import ia3 as _ia3  # noqa: F401  (registers the method)
from fastpeft.integrations import sparse as _sparse  # noqa: F401  (registers BitFit and FishMask)
from fastpeft.integrations import prompt_learning as _prompt_learning  # noqa: F401  (registers the methods)
from fastpeft.integrations.registry import INJECTORS, Injection, peft_type_of
from fastpeft.nn.base import keep_standard_4bit_layout


def _modules_to_save(model: nn.Module, targets) -> list:
    """Parameter names of the modules peft would train in full (``modules_to_save``)."""
    if not targets:
        return []
    names = []
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            for pname, p in module.named_parameters():
                p.requires_grad_(True)
                names.append(f"{name}.{pname}")
    return names


class _TunerModel(nn.Module):
    """Holds the adapted model as ``.model``: parameter names read ``base_model.model.<path>``."""

    def __init__(self, model: nn.Module, prefix=None):
        super().__init__()
        self.model = model
        self.prefix = prefix

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftConfigs(dict):
    """Adapter name -> config, as peft's ``PeftModel.peft_config``; attribute access reads the active
    adapter's config (``model.peft_config.target_modules``), as fastpeft's single config did."""

    def __init__(self, configs: dict, owner_active):
        super().__init__(configs)
        object.__setattr__(self, "_owner_active", owner_active)

    def _config(self):
        active = self._owner_active()
        return self[active] if active in self else next(iter(self.values()))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._config(), name)

    def __setattr__(self, name, value):
        setattr(self._config(), name, value)

    def __reduce__(self):  # pickles / deep-copies as a plain dict of configs
        return (dict, (dict(self),))


class FastPeftModel(nn.Module):
    """A transformers model with fastpeft adapters, laid out and saved like peft's PeftModel.

    Attribute access falls through to the wrapped model (``config``, ``generate`` ...). For LoRA and
    (IA)^3 it has peft's adapter lifecycle: ``add_adapter``, ``set_adapter``, ``delete_adapter``,
    ``disable_adapter()``, ``merge_adapter`` / ``unmerge_adapter``, ``active_adapters`` (see
    ``fastpeft.integrations.adapters``); other methods raise NotImplementedError for those.
    """

    def __init__(self, model: nn.Module, peft_config, injection: Injection, adapter_name: str = "default"):
        super().__init__()
        peft_type = peft_type_of(peft_config)
        self.base_model = _TunerModel(model, _adapters.PREFIXES.get(peft_type))
        self._active = [adapter_name]
        self._configs = {adapter_name: peft_config}
        self._injection = injection
        self._multi = False  # layers converted to the named multi-adapter layout
        self._modules_to_save_names = []
        for name, module in injection.owned_modules.items():
            self.add_module(name, module)

    @property
    def peft_config(self) -> PeftConfigs:
        """Adapter name -> config (peft's ``peft_config``); attributes read the active adapter's config."""
        return PeftConfigs(self._configs, lambda: self.active_adapter)

    @property
    def peft_type(self) -> str:
        """The method's ``peft_type`` ("LORA", "IA3", ...)."""
        return peft_type_of(next(iter(self._configs.values())))

    @property
    def prefix(self):
        """The prefix of this method's parameter names, as peft's tuner has it ("lora_", "ia3_"; None for others)."""
        return _adapters.PREFIXES.get(self.peft_type)

    @property
    def active_adapters(self) -> list:
        """The names of the active adapters."""
        return list(self._active)

    @property
    def active_adapter(self):
        """The active adapter's name (a list when several are active), as peft's ``active_adapter``."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self):
        """The active adapter's config."""
        return self._configs[self._active[0]]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)

    def forward(self, *args, **kwargs):
        """Run the adapted model (methods that change the inputs, like soft prompts, do so here)."""
        if self._injection.forward is not None:
            return self._injection.forward(self.base_model.model, *args, **kwargs)
        return self.base_model.model(*args, **kwargs)

    # ---- parameters --------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name=None) -> dict:
        """An adapter's tensors (default: the active one's) under peft's checkpoint keys
        (``base_model.model.<path>...`` for module adapters, ``prompt_embeddings`` for prompt
        learning), as live parameter views."""
        name = self._adapter_name(adapter_name)
        if self._multi:
            params = dict(self.base_model.model.named_parameters())
            tensors = _adapters.adapter_tensors(self.base_model.model, name)
            if name == next(iter(self._configs)):  # the first adapter's modules_to_save
                tensors.update({n: params[n] for n in self._modules_to_save_names})
            return {checkpoint.PEFT_PREFIX + n: t for n, t in tensors.items()}
        if self._injection.state_dict is not None:
            return self._injection.state_dict()
        params = dict(self.base_model.model.named_parameters())
        return {checkpoint.PEFT_PREFIX + n: params[n] for n in self._injection.parameter_names}

    def _adapter_name(self, adapter_name=None) -> str:
        if adapter_name is None:
            if not self._active:
                raise ValueError("this model has no active adapter; pass adapter_name")
            return self._active[0]
        if adapter_name not in self._configs:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(self._configs)}")
        return adapter_name

    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all) parameter counts; a 4-bit weight counts its unpacked elements, as peft does."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2 * (p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1)
            total += n
            trainable += n if p.requires_grad else 0
        if self._injection.trainable_count is not None:
            trainable = self._injection.trainable_count()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as peft does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, selected_adapters=None,
                        is_main_process: bool = True) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does (atomically);
        ``peft.PeftModel.from_pretrained`` loads them. As peft does, the saved config says
        ``inference_mode=True`` (P-tuning / prefix-projection checkpoints load only that way), each
        adapter of ``selected_adapters`` (default: all) goes to ``save_directory`` if it is named
        "default", else to ``save_directory/<name>``, ``safe_serialization=False`` writes peft's
        ``adapter_model.bin`` (a pickle: fastpeft itself loads safetensors only), and only the main
        process writes."""
        if not is_main_process:
            return
        names = list(self._configs) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._adapter_name(name)
        for name in names:
            config = copy.copy(self._configs[name])
            if hasattr(config, "inference_mode"):
                config.inference_mode = True
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            tensors = self.adapter_state_dict(name)
            if safe_serialization:
                checkpoint.save_adapter(directory, config, tensors)
            else:
                _save_adapter_bin(directory, config, tensors)

    def load_adapter(self, directory: str, adapter_name=None, is_trainable: bool = False) -> None:
        """Load adapter weights saved by fastpeft or peft into the active adapter, or into
        ``adapter_name`` (added from the saved config if this model lacks it; LoRA and (IA)^3; a new
        adapter stays frozen unless ``is_trainable``). Nothing changes unless all weights fit."""
        tensors = checkpoint.load_tensors(directory)
        if adapter_name is not None and adapter_name not in self._configs:
            self.add_adapter(adapter_name, checkpoint.load_config(directory))
            try:
                self._assign_adapter(tensors, directory, adapter_name)
            except checkpoint.CheckpointError:
                self.delete_adapter(adapter_name)
                raise
            if is_trainable:
                self.set_requires_grad(adapter_name, True)
            return
        self._assign_adapter(tensors, directory, adapter_name)

    @torch.no_grad()
    def _assign_adapter(self, tensors: dict, source: str = "the given state dict", adapter_name=None) -> None:
        if self._injection.load_state_dict is not None and not self._multi:
            self._injection.load_state_dict(tensors)
            return
        own = self.adapter_state_dict(adapter_name)
        checkpoint.check_tensors(tensors, own, source)
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))

    # ---- unloading ---------------------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The adapted transformers model (``base_model.model``), as peft's ``get_base_model``."""
        return self.base_model.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the active adapters (or ``adapter_names``) into the (dense) base weights and return the
        plain transformers model. ``safe_merge`` first checks the adapters hold only finite values
        (``progressbar`` is accepted for peft's signature)."""
        if safe_merge:
            for name, tensor in self.adapter_state_dict().items():
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"NaNs detected in {name}; nothing was merged")
        if self._multi:
            return _adapters.unload(self.base_model.model, merge=True, adapter_names=adapter_names)
        if self._injection.merge_and_unload is None:
            raise NotImplementedError(f"{self.peft_type} adapters cannot be merged into the base weights")
        _fused_loss.uninstall(self.base_model.model)
        for name in adapter_names or []:
            self._adapter_name(name)
        return self._injection.merge_and_unload()

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain transformers model."""
        _fused_loss.uninstall(self.base_model.model)
        if self._multi:
            return _adapters.unload(self.base_model.model, merge=False)
        return self._injection.unload()

    # ---- several adapters (LoRA, (IA)^3) ------------------------------------------------------------

    def _lifecycle(self, what: str, several: bool = False) -> list:
        """The adapter layers, each with peft's per-layer lifecycle interface: the multi-adapter
        layers, or views of the single-adapter ones (whose parameter names then stay as they are).
        ``several``: the call needs the multi-adapter layout (add / delete): convert to it."""
        if self.peft_type not in _adapters.PREFIXES:
            raise NotImplementedError(
                f"{what} is implemented for LoRA and (IA)^3 adapters; this model's method is {self.peft_type}. "
                "Use peft for it."
            )
        from fastpeft.nn.lora_embedding import LoRAEmbedding
        from fastpeft.nn.trainable_tokens import TrainableTokensEmbedding

        if any(isinstance(m, (LoRAEmbedding, TrainableTokensEmbedding)) for m in self.base_model.model.modules()):
            raise NotImplementedError(
                f"{what} is not implemented for models with embedding LoRA layers (LoRAEmbedding) or trainable tokens "
                "(trainable_token_indices); use peft for it"
            )
        if not self._multi and several:
            _adapters.to_multi(self.base_model.model, self.peft_type, next(iter(self._configs)))
            self._multi = True
        if not self._multi:
            return _adapters.single_views(self.base_model.model, self.peft_type, next(iter(self._configs)), self._active)
        return [layer for _, layer in _adapters.multi_layers(self.base_model.model)]

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
        """Add an adapter of the same method from ``peft_config`` to the modules it targets (peft's
        target rules). As in peft, the new adapter is neither active nor trainable until
        ``set_adapter``. Validates everything before changing the model."""
        if low_cpu_mem_usage:
            raise NotImplementedError("fastpeft's add_adapter does not implement low_cpu_mem_usage=True")
        if peft_type_of(peft_config) != self.peft_type:
            raise ValueError(
                f"Cannot combine adapters with different peft types: this model has {self.peft_type}, got "
                f"{peft_type_of(peft_config)}"
            )
        if adapter_name in self._configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if getattr(peft_config, "use_dora", False):  # before the layout changes (_lifecycle converts it)
            raise NotImplementedError("use_dora=True in add_adapter: a DoRA adapter runs alone on its layers; fastpeft "
                                      "does not add DoRA adapters to a model, use peft for that")  # fmt: skip
        self._lifecycle("add_adapter", several=True)
        config = _with_task_defaults(peft_config)
        _adapters.add_adapter(self.base_model.model, self.peft_type, adapter_name, config)
        self._configs[adapter_name] = config

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list of names) the active adapter(s): they train (unless
        ``inference_mode``), every other adapter is frozen, as in peft."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._adapter_name(name)
        for layer in self._lifecycle("set_adapter"):
            layer.set_adapter(names, inference_mode)
        self._active = names

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapter(s), as peft's ``set_requires_grad``."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._adapter_name(name)
        for layer in self._lifecycle("set_requires_grad"):
            for name in names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (not while it is merged). If it was active, the first remaining adapter
        in sorted order becomes active, as in peft."""
        self._adapter_name(adapter_name)
        layers = self._lifecycle("delete_adapter", several=True)
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() first")
        for layer in layers:
            layer.delete_adapter(adapter_name)
        del self._configs[adapter_name]
        if adapter_name in self._active:
            remaining = [a for a in self._active if a != adapter_name] or sorted(self._configs)[:1]
            for layer in layers:
                layer.set_adapter(remaining)
            self._active = remaining

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context in which the model runs without adapters (merged ones are unmerged first), and no
        adapter trains; on exit the active adapters are active and trainable again, as in peft."""
        layers = self._lifecycle("disable_adapter")
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the active adapters (or ``adapter_names``) into the dense base weights; forward then
        runs the base layers alone until ``unmerge_adapter``. ``safe_merge`` checks for non-finite
        weights first."""
        layers = self._lifecycle("merge_adapter")
        for name in adapter_names or []:
            self._adapter_name(name)
        for layer in layers:
            base = layer.base_layer
            if _adapters.is_bnb_linear4bit(base) or not base.weight.dtype.is_floating_point:
                raise NotImplementedError("merge_adapter needs dense base layers; nothing was merged")
        if safe_merge:
            for layer in layers:
                for name in adapter_names or self._active:
                    for p in layer.adapter_parameters(name):
                        if not torch.isfinite(p).all():
                            raise ValueError(f"NaNs detected in the adapter {name!r}; nothing was merged")
        for layer in layers:
            layer.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again."""
        for layer in self._lifecycle("unmerge_adapter"):
            layer.unmerge()

    # ---- training helpers --------------------------------------------------------------------------

    def create_optimizer(self, optimizer_cls=None, *, loraplus_lr_ratio=None, **kwargs) -> torch.optim.Optimizer:
        """The optimizer this method trains with, over the trainable parameters: ``torch.optim.AdamW``
        for module adapters, ``fastpeft.optim.SparseMaskedAdamW`` for sparse methods (BitFit,
        FishMask). ``kwargs`` (lr, betas, eps, weight_decay ...) go to the optimizer.

        ``loraplus_lr_ratio`` (LoRA only) builds a LoRA+ optimizer with exactly the parameter groups
        of peft's ``peft.optimizers.create_loraplus_optimizer``: A matrices (and other weights) at
        ``lr``, B matrices and 1-d parameters at ``lr * loraplus_lr_ratio``, embedding LoRA factors at
        ``loraplus_lr_embedding`` (default 1e-6), weight decay ``loraplus_weight_decay`` (default 0.0;
        0.0 for B-group biases and LayerNorm parameters). ``lr`` is then required and
        ``optimizer_cls`` (default ``torch.optim.AdamW``) gets the groups and the remaining kwargs."""
        if loraplus_lr_ratio is not None:
            from fastpeft.integrations.loraplus import create_loraplus_optimizer

            if self.peft_type != "LORA":
                raise ValueError(f"loraplus_lr_ratio is for LoRA adapters; this model's method is {self.peft_type}")
            return create_loraplus_optimizer(self, optimizer_cls or torch.optim.AdamW,
                                             loraplus_lr_ratio=loraplus_lr_ratio, **kwargs)  # fmt: skip
        for name in ("loraplus_lr_embedding", "loraplus_weight_decay"):
            if name in kwargs:
                raise ValueError(f"{name} is a LoRA+ option: pass loraplus_lr_ratio too")
        params = [p for p in self.parameters() if p.requires_grad]
        if self._injection.optimizer is not None:
            if optimizer_cls is not None:
                raise ValueError(f"{self.peft_type} trains with its own optimizer; optimizer_cls must be None")
            return self._injection.optimizer(params, **kwargs)
        return (optimizer_cls or torch.optim.AdamW)(params, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Turn on the wrapped model's gradient checkpointing. The embeddings are frozen, so their
        output is made to require grad (as peft does), else reentrant checkpoints would see no grad."""
        self.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.base_model.model, "enable_input_require_grads"):
            self.base_model.model.enable_input_require_grads()


@functools.lru_cache(maxsize=None)
def _wrapper_class(model_cls: type) -> type:
    """FastPeftModel whose forward carries ``model_cls.forward``'s signature: the HF Trainer reads the
    signature to decide which dataset columns to pass (peft gets that by special-casing PeftModel)."""

    def forward(self, *args, **kwargs):
        return FastPeftModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(model_cls.forward)
    forward.__doc__ = f"Calls the wrapped {model_cls.__name__}."
    return type(f"FastPeft{model_cls.__name__}", (FastPeftModel,), {"forward": forward, "__module__": __name__})


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision=None, low_cpu_mem_usage: bool = False,
                   fused_loss: Optional[bool] = None, group_projections=True, **method_kwargs) -> FastPeftModel:
    """Replace the modules ``peft_config`` targets with fused fastpeft layers; freeze the rest.

    ``peft_config`` is a peft config object or a fastpeft config for a method peft lacks (see
    ``fastpeft.integrations.registry.INJECTORS`` for the accepted ``peft_type``s). The model may be
    dense or loaded in 4-bit through ``BitsAndBytesConfig``. Layers are selected with peft's own
    rules; options fastpeft does not implement, and targeted modules it cannot run, raise before
    the model is touched. ``method_kwargs`` go to the method's injector (e.g. the calibration
    batches a FishMask config needs).

    The other arguments are ``peft.get_peft_model``'s: ``adapter_name`` names the adapter;
    ``autocast_adapter_dtype=False`` keeps LoRA / (IA)^3 weights in a float base weight's dtype
    (True, the default: float32); ``revision`` is recorded in the config; ``mixed=True`` and
    ``low_cpu_mem_usage=True`` are not implemented.

    ``fused_loss`` (default: on for transformers ``*ForCausalLM`` models, else off): in training with
    ``labels`` the LM head and the loss run as ``fastpeft.ops.linear_cross_entropy``, so no
    ``[tokens, vocab]`` logits exist (the output's ``logits`` is then None); see
    ``fastpeft.integrations.fused_loss``. ``fused_loss=False`` keeps the model's own forward.

    ``group_projections`` (LoRA): the targeted projections that read the same input (q/k/v, gate/up,
    found by one example forward of ``model.dummy_inputs``) run as one fused op each
    (``fastpeft.integrations.grouping``); names, checkpoints and peft interop do not change. Without
    dropout the results equal peft's; with dropout a group shares one mask where peft draws one per
    projection. ``False``: one fused op per projection. A dict: the example inputs
    (``model(**inputs)``) to find the groups with, for models without ``dummy_inputs``.
    """
    if not isinstance(group_projections, (bool, dict)):
        raise TypeError(f"group_projections must be True, False or a dict of example inputs, got {group_projections!r}")
    if mixed:
        raise NotImplementedError("fastpeft.get_peft_model does not build mixed-adapter models; use peft (mixed=True)")
    if low_cpu_mem_usage:
        raise NotImplementedError("fastpeft.get_peft_model does not implement low_cpu_mem_usage=True")
    peft_type = peft_type_of(peft_config)
    if peft_type not in INJECTORS:
        raise NotImplementedError(
            f"fastpeft.get_peft_model supports {sorted(INJECTORS)} configs, got {type(peft_config).__name__}"
        )
    config = _with_task_defaults(peft_config)
    if revision is not None and hasattr(config, "revision"):
        config.revision = revision
    if fused_loss and not _fused_loss.is_causal_lm(model):
        raise ValueError(f"fused_loss=True needs a transformers *ForCausalLM model with lm_head, got {type(model).__name__}")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        injection = INJECTORS[peft_type](model, config, **method_kwargs)
    except Exception:
        for n, p in model.named_parameters():  # injectors validate before changing modules
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        raise
    # Every 4-bit base keeps bitsandbytes' standard layout: its AVX512-BF16 CPU repack (done on the
    # first eval forward) is lossy and breaks training afterwards (its packed forward adds the bias
    # in place on an autograd output), also for the bases fastpeft does not wrap (adapters, prompts).
    for module in model.modules():
        keep_standard_4bit_layout(module)
    modules_to_save = _modules_to_save(model, getattr(config, "modules_to_save", None))
    injection.parameter_names = list(injection.parameter_names) + modules_to_save
    if not autocast_adapter_dtype:
        _keep_base_dtype(model)
    if peft_type == "LORA" and group_projections is not False:
        from fastpeft.integrations import grouping

        grouping.group_projections(model, None if group_projections is True else group_projections)
    if fused_loss is None:
        fused_loss = _fused_loss.is_causal_lm(model)
    if fused_loss:
        _fused_loss.install(model)  # raises for a model that is not a causal LM, before any change
    fast = _wrapper_class(type(model))(model, config, injection, adapter_name)
    fast._modules_to_save_names = modules_to_save
    return fast


def _keep_base_dtype(model: nn.Module) -> None:
    """peft's ``autocast_adapter_dtype=False``: adapter weights in the base weight's dtype when that
    is a float dtype (quantized bases keep float32 adapters)."""
    from fastpeft.nn.ia3 import IA3Linear
    from fastpeft.nn.lora import LoRALinear
    from fastpeft.nn.lora_embedding import LoRAEmbedding

    for module in model.modules():
        if isinstance(module, (LoRALinear, IA3Linear, LoRAEmbedding)):
            dtype = module.base_layer.weight.dtype
            if not dtype.is_floating_point:
                continue
            with torch.no_grad():
                for p in module.parameters(recurse=True):
                    if p.requires_grad and p.dtype.is_floating_point:
                        p.data = p.data.to(dtype)


def _save_adapter_bin(directory: str, config, tensors: dict) -> None:
    """peft's ``safe_serialization=False`` checkpoint: ``adapter_model.bin`` (torch.save) + the config."""
    if os.path.isfile(directory):
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    os.makedirs(directory, exist_ok=True)
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    checkpoint._atomic_write(os.path.join(directory, "adapter_model.bin"), lambda p: torch.save(data, p))
    text = checkpoint.config_to_json(config)
    checkpoint._atomic_write(os.path.join(directory, checkpoint.CONFIG_NAME), lambda p: open(p, "w").write(text))


def _with_task_defaults(config):
    """A copy of ``config`` with peft's task defaults applied (SEQ_CLS saves its classifier head)."""
    config = copy.deepcopy(config)
    if getattr(config, "task_type", None) == "SEQ_CLS" and hasattr(config, "modules_to_save") and not config.modules_to_save:
        config.modules_to_save = ["classifier", "score"]
    return config


def from_pretrained(model: nn.Module, directory: str) -> FastPeftModel:
    """Load an adapter saved by fastpeft or peft (``save_pretrained``) onto ``model``.

    A missing, truncated or corrupted checkpoint, or one that does not fit the model, raises
    ``fastpeft.integrations.checkpoint.CheckpointError`` and leaves ``model`` as it was.
    """
    config = checkpoint.load_config(directory)
    tensors = checkpoint.load_tensors(directory)  # read (and validate) before touching the model
    # Methods whose injector needs something from the checkpoint (FishMask: its mask) say so.
    hook = getattr(config, "method_kwargs_from_checkpoint", None)
    method_kwargs = hook(model, tensors, directory) if hook is not None else {}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    fast = get_peft_model(model, config, **method_kwargs)
    try:
        fast._assign_adapter(tensors, directory)  # validates everything before the first copy
    except checkpoint.CheckpointError:
        fast.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    return fast
