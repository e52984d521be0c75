"""LoRA+ (https://huggingface.co/papers/2402.12354) for ``FastPeftModel``: the parameter groups of
peft's ``peft.optimizers.create_loraplus_optimizer``, built over fastpeft's layers.

peft sorts each trainable parameter into one of four groups: embedding LoRA factors (parameters of
a LoRA ``Embedding`` layer), B (names containing ``lora_B`` and every 1-d parameter, split by
whether transformers' ``get_parameter_names`` would decay them: not a bias, not inside a
LayerNorm), and A (everything else). fastpeft's parameter names are peft's without the adapter name,
so the same name rules apply; embedding factors are found by their layer (``LoRAEmbedding``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _embedding_parameter_ids(model: nn.Module) -> set:
    try:
        from fastpeft.nn.lora_embedding import LoRAEmbedding
    except ImportError:  # no embedding LoRA layer in this build
        return set()
    return {id(p) for m in model.modules() if isinstance(m, LoRAEmbedding) for p in m.parameters(recurse=False)}


def loraplus_parameter_groups(model: nn.Module) -> dict:
    """name -> parameter, per peft group: ``{"groupA", "embedding", "groupB", "groupB_no_decay"}``
    (in ``model.named_parameters()`` order), as ``create_loraplus_optimizer`` sorts them."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    embedding = _embedding_parameter_ids(model)
    groups = {"groupA": {}, "groupB": {}, "groupB_no_decay": {}, "embedding": {}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["groupB" if name in decay else "groupB_no_decay"][name] = param
        else:
            groups["groupA"][name] = param
    return groups


def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type, *, lr=None, loraplus_lr_ratio,
                              **kwargs) -> torch.optim.Optimizer:  # fmt: skip
    """peft's ``create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=...)``
    over ``model``'s trainable parameters: the same four groups in the same order with the same
    ``lr`` / ``weight_decay``; ``loraplus_lr_embedding`` (default 1e-6) and ``loraplus_weight_decay``
    (default 0.0) are read from ``kwargs``, the rest goes to ``optimizer_cls``."""
    if lr is None:
        raise ValueError("LoRA+ needs lr= (the learning rate of the A matrices)")
    _check_rate("lr", lr)
    _check_rate("loraplus_lr_ratio", loraplus_lr_ratio)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    _check_rate("loraplus_weight_decay", weight_decay)
    _check_rate("loraplus_lr_embedding", lr_embedding)
    groups = loraplus_parameter_groups(model)
    param_groups = [
        {"params": list(groups["groupA"].values()), "weight_decay": weight_decay, "lr": lr},
        {"params": list(groups["embedding"].values()), "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": list(groups["groupB"].values()), "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": list(groups["groupB_no_decay"].values()), "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(param_groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
