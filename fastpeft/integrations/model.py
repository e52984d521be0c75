"""``fastpeft.get_peft_model``: put fused fastpeft layers into a HF transformers model from a peft config.

The returned ``FastPeftModel`` is laid out like peft's ``PeftModel`` (``model.base_model.model`` is
the adapted transformers model), so adapter parameters are named exactly as peft saves them and
checkpoints are interchangeable with peft's.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

from fastpeft.integrations import checkpoint
from fastpeft.integrations import lora as _lora  # noqa: F401  (registers the method)
from fastpeft.integrations import adapter as _adapter  # noqa: F401  (registers the method)
from fastpeft.integrations import ia3 as _ia3  # noqa: F401  (registers the method)
from fastpeft.integrations import sparse as _sparse  # noqa: F401  (registers BitFit and FishMask)
from fastpeft.integrations import prompt_learning as _prompt_learning  # noqa: F401  (registers the methods)
from fastpeft.integrations.registry import INJECTORS, Injection, peft_type_of


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

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class FastPeftModel(nn.Module):
    """A transformers model with fastpeft adapters, laid out and saved like peft's PeftModel.

    Attribute access falls through to the wrapped model (``config``, ``generate`` ...).
    """

    def __init__(self, model: nn.Module, peft_config, injection: Injection):
        super().__init__()
        self.base_model = _TunerModel(model)
        self.peft_config = peft_config
        self._injection = injection
        for name, module in injection.owned_modules.items():
            self.add_module(name, module)

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

    def adapter_state_dict(self) -> dict:
        """The adapter's tensors under peft's checkpoint keys (``base_model.model.<path>...`` for
        module adapters, ``prompt_embeddings`` for prompt learning), as live parameter views."""
        if self._injection.state_dict is not None:
            return self._injection.state_dict()
        params = dict(self.base_model.model.named_parameters())
        return {checkpoint.PEFT_PREFIX + n: params[n] for n in self._injection.parameter_names}

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

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does (atomically);
        ``peft.PeftModel.from_pretrained`` loads them. As peft does, the saved config says
        ``inference_mode=True`` (P-tuning / prefix-projection checkpoints load only that way)."""
        config = copy.copy(self.peft_config)
        if hasattr(config, "inference_mode"):
            config.inference_mode = True
        checkpoint.save_adapter(save_directory, config, self.adapter_state_dict())

    def load_adapter(self, directory: str) -> None:
        """Load adapter weights saved by fastpeft or peft. Nothing changes unless all of them fit."""
        self._assign_adapter(checkpoint.load_tensors(directory), directory)

    @torch.no_grad()
    def _assign_adapter(self, tensors: dict, source: str = "the given state dict") -> None:
        if self._injection.load_state_dict is not None:
            self._injection.load_state_dict(tensors)
            return
        own = self.adapter_state_dict()
        checkpoint.check_tensors(tensors, own, source)
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))

    # ---- unloading ---------------------------------------------------------------------------------

    def merge_and_unload(self) -> nn.Module:
        """Fold the adapters into the (dense) base weights and return the plain transformers model."""
        if self._injection.merge_and_unload is None:
            raise NotImplementedError(f"{peft_type_of(self.peft_config)} adapters cannot be merged into the base weights")
        return self._injection.merge_and_unload()

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain transformers model."""
        return self._injection.unload()

    # ---- training helpers --------------------------------------------------------------------------

    def create_optimizer(self, **kwargs) -> torch.optim.Optimizer:
        """The optimizer this method trains with, over the trainable parameters: ``torch.optim.AdamW``
        for module adapters, ``fastpeft.optim.SparseMaskedAdamW`` for sparse methods (BitFit,
        FishMask). ``kwargs`` (lr, betas, eps, weight_decay ...) go to the optimizer."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self._injection.optimizer is not None:
            return self._injection.optimizer(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

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


def get_peft_model(model: nn.Module, peft_config, **method_kwargs) -> FastPeftModel:
    """Replace the modules ``peft_config`` targets with fused fastpeft layers; freeze the rest.

    ``peft_config`` is a peft config object or a fastpeft config for a method peft lacks (see
    ``fastpeft.integrations.registry.INJECTORS`` for the accepted ``peft_type``s). The model may be
    dense or loaded in 4-bit through ``BitsAndBytesConfig``. Layers are selected with peft's own
    rules; options fastpeft does not implement, and targeted modules it cannot run, raise before
    the model is touched. ``method_kwargs`` go to the method's injector (e.g. the calibration
    batches a FishMask config needs).
    """
    peft_type = peft_type_of(peft_config)
    if peft_type not in INJECTORS:
        raise NotImplementedError(
            f"fastpeft.get_peft_model supports {sorted(INJECTORS)} configs, got {type(peft_config).__name__}"
        )
    config = _with_task_defaults(peft_config)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        injection = INJECTORS[peft_type](model, config, **method_kwargs)
    except Exception:
        for n, p in model.named_parameters():  # injectors validate before changing modules
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        raise
    injection.parameter_names = list(injection.parameter_names) + _modules_to_save(
        model, getattr(config, "modules_to_save", None)
    )
    return _wrapper_class(type(model))(model, config, injection)


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
