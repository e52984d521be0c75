"""The method registry behind ``fastpeft.get_peft_model``.

Each method family (LoRA, (IA)^3, prompt learning, BitFit / FishMask, bottleneck adapters) lives in
its own module of ``fastpeft.integrations`` and registers an *injector* under its config's
``peft_type``. An injector takes (model, config), validates everything first (raising before the
model is touched), changes the model in place and returns an ``Injection``: what was added and how
to read, load and undo it. ``FastPeftModel`` only ever talks to the ``Injection``.

fastpeft's own configs (methods peft lacks) register their class too, so checkpoints saved with
them load through ``fastpeft.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

from torch import nn


@dataclasses.dataclass
class Injection:
    """What an injector did to a model.

    ``parameter_names``: the trainable adapter parameters (names relative to the model); by default
    they are also the checkpoint's tensors, saved as ``base_model.model.<name>`` like peft does.
    ``unload``: removes the adapters without merging and returns the plain model.
    ``merge_and_unload``: folds the adapters into dense base weights (None: not supported).
    ``state_dict``: the checkpoint tensors under peft's keys, for methods whose checkpoint is not
    simply their parameters (prompt learning saves ``prompt_embeddings``). The returned tensors must
    be live views of the parameters: loading copies into them.
    ``forward``: replaces ``model(*args, **kwargs)`` for methods that change the inputs (soft prompts
    prepend virtual tokens); called as ``forward(model, *args, **kwargs)``.
    ``load_state_dict``: loads checkpoint tensors (as read from the file) for methods whose
    checkpoint tensors are not live views (sparse deltas); must validate everything first and raise
    ``CheckpointError`` before changing anything. None: shapes are checked against ``state_dict``'s
    and the tensors copied into it.
    ``optimizer``: ``optimizer(params, **kwargs)`` -> the optimizer this method trains with (None:
    ``torch.optim.AdamW``); sparse methods return ``SparseMaskedAdamW`` over their masks.
    ``trainable_count``: how many entries train, for methods that train parts of tensors (FishMask);
    None: every element of a parameter with requires_grad counts.
    ``owned_modules``: modules the injector created outside the model's own tree (a prompt encoder),
    registered on the FastPeftModel so ``.to()``, ``parameters()`` and optimizers see them.
    """

    parameter_names: list
    unload: Callable[[], nn.Module]
    merge_and_unload: Optional[Callable[[], nn.Module]] = None
    state_dict: Optional[Callable[[], dict]] = None
    forward: Optional[Callable] = None
    load_state_dict: Optional[Callable[[dict], None]] = None
    optimizer: Optional[Callable] = None
    trainable_count: Optional[Callable[[], int]] = None
    owned_modules: Dict[str, nn.Module] = dataclasses.field(default_factory=dict)


# peft_type -> injector(model, config, **method_kwargs) -> Injection
INJECTORS: Dict[str, Callable] = {}
# peft_type -> config class, for fastpeft's own configs (peft's load through PeftConfig)
CONFIG_CLASSES: Dict[str, type] = {}


def register_method(peft_type: str, injector: Callable, config_class: Optional[type] = None) -> None:
    """Make ``get_peft_model`` accept configs whose ``peft_type`` is ``peft_type``."""
    INJECTORS[peft_type] = injector
    if config_class is not None:
        CONFIG_CLASSES[peft_type] = config_class


def peft_type_of(config) -> str:
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) or type(config).__name__
