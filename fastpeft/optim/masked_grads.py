"""Masked weight gradients: the ``nn.Linear`` layers of a model whose weight trains at a sparse
mask compute that weight's gradient at the mask only (``fastpeft.ops.masked_weight_linear``).

The layers keep their modules and parameters (state_dict, optimizers and checkpoints are
unaffected); only each layer's ``forward`` is replaced, and ``remove_masked_weight_grads`` puts
the class's forward back. The weight's ``.grad`` is the dense masked gradient -- the dense-masked
practice's, zero off the mask -- computed without the dense ``grad_out^T x`` GEMM, which for a
linear layer is a third of its forward + backward FLOPs.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Dict, List

import torch
from torch import nn

from fastpeft.ops.masked_linear import masked_weight_linear
from fastpeft.optim.masks import Mask

_INDICES = "_fastpeft_mask_indices"  # the non-persistent buffer holding a patched layer's indices
_KERNEL_DEVICES = ("cpu", "cuda")


@dataclasses.dataclass
class MaskedGradsReport:
    """What ``use_masked_weight_grads`` did: ``patched`` module names, and ``skipped``: module
    name -> reason, for every ``nn.Linear`` with a masked weight left on the dense-gradient path."""

    patched: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)


def _masked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not self.weight.requires_grad:
        return nn.Linear.forward(self, x)  # no weight gradient to compute: the plain layer
    return masked_weight_linear(x, self.weight, self.bias, getattr(self, _INDICES))


def _problem(module: nn.Module, weight: torch.Tensor) -> str:
    """Why a masked nn.Linear cannot compute masked gradients, or ''."""
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward (not nn.Linear's)"
    if "forward" in module.__dict__:
        return "the layer's forward is already replaced (a hook library or a patch holds it)"
    if not weight.is_floating_point():
        return f"the weight is {weight.dtype}, not floating point"
    if weight.device.type not in _KERNEL_DEVICES:
        return f"no fastpeft kernel on {weight.device.type}"
    if not weight.is_contiguous():
        return "the weight is not contiguous (flat indices need the row-major layout)"
    return ""


def use_masked_weight_grads(model: nn.Module, mask: Mask) -> MaskedGradsReport:
    """Make every ``nn.Linear`` whose ``weight`` has indices in ``mask`` compute the weight's
    gradient at those indices only.

    ``mask``: parameter name (as in ``model.named_parameters()``) -> sorted flat indices, or
    None (trained in full: left alone). Masked weights of other modules (embeddings, norms,
    convolutions) keep their dense gradient. ``nn.Linear`` subclasses with their own forward
    (bitsandbytes layers), layers whose forward a library already replaced (accelerate's hooks)
    and layers with a quantized, non-contiguous or meta weight keep it too and are reported in
    ``skipped``. Calling it again re-points already patched layers at the new mask's indices.
    """
    if not isinstance(mask, dict):
        raise ValueError(f"mask must be a dict of parameter name -> flat indices or None, got {type(mask).__name__}")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    report = MaskedGradsReport()
    for name, idx in mask.items():
        module_name, _, leaf = name.rpartition(".")
        if idx is None or leaf != "weight" or name not in params:
            continue
        module = modules.get(module_name)
        if not isinstance(module, nn.Linear):
            continue  # embeddings, norms, convolutions: not this patch's business, dense gradients
        if hasattr(module, _INDICES):  # patched before: new indices
            setattr(module, _INDICES, idx.to(module.weight.device))
            report.patched.append(module_name)
            continue
        problem = _problem(module, params[name])
        if problem:
            report.skipped[module_name] = problem
            continue
        module.register_buffer(_INDICES, idx.to(module.weight.device), persistent=False)
        module.forward = types.MethodType(_masked_forward, module)
        report.patched.append(module_name)
    return report


def remove_masked_weight_grads(model: nn.Module) -> List[str]:
    """Undo ``use_masked_weight_grads``: the layers run ``nn.Linear.forward`` again (dense weight
    gradients). Returns the names of the layers restored."""
    restored = []
    for name, module in model.named_modules():
        if hasattr(module, _INDICES) and "forward" in module.__dict__:
            del module.forward
            delattr(module, _INDICES)
            restored.append(name)
    return restored
