"""Fused linear cross-entropy in transformers causal LMs: ``model(input_ids, labels=labels).loss``
without the ``[tokens, vocab]`` logits.

``install(model)`` replaces a ``*ForCausalLM`` model's forward (on the instance; ``uninstall`` puts
the class's back) with one that, in training mode with ``labels``, runs the decoder (``model.model``)
and computes the loss of the LM head with ``fastpeft.ops.linear_cross_entropy``, exactly as
transformers' ``ForCausalLMLoss`` defines it: labels shifted by one (or ``shift_labels=`` as given),
``ignore_index=-100``, mean over the counted tokens or, with ``num_items_in_batch``, the sum divided
by it, float32 math, and the head's logit soft-capping (``config.final_logit_softcapping``, Gemma-2).
The output then has ``logits=None``: the point is never to build them. In eval mode, without
labels, or with a head the op cannot run, the model's own forward runs.

The head may be a dense ``nn.Linear``, a bitsandbytes 4-bit or int8 layer, or a fastpeft
``LoRALinear`` on one of those (LoRA on ``lm_head``, which peers drop silently: trl #4612) without
dropout in training. A head whose own weight or bias trains (``modules_to_save``, BitFit, FishMask)
runs the model's forward.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from fastpeft.nn.base import base_kind, base_layer_problem, cast, compute_dtype, frozen_weight
from fastpeft.nn.lora import LoRALinear
from fastpeft.ops.linear_cross_entropy import linear_cross_entropy

_MARK = "_fastpeft_fused_loss"
IGNORE_INDEX = -100


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM this module can fuse: ``*ForCausalLM`` with ``model`` and ``lm_head``."""
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "lm_head") and hasattr(model, "model")


def head_problem(head: nn.Module, training: bool = True) -> Optional[str]:
    """Why the fused loss cannot run this LM head (None if it can)."""
    if isinstance(head, LoRALinear):
        if head.merged:
            return None
        if training and head.lora_dropout > 0:
            return "LoRA on lm_head with dropout (the fused loss applies no dropout)"
        head = head.base_layer
    if getattr(head, "_forward_hooks", None) or getattr(head, "_forward_pre_hooks", None):
        return "hooks on lm_head"
    if any(p.requires_grad for p in head.parameters()):
        return "lm_head's own weight or bias trains (modules_to_save, BitFit, FishMask): the fused loss keeps it frozen"
    return base_layer_problem(head)


def _head_args(head: nn.Module, hidden: torch.Tensor):
    """(hidden in the compute dtype, frozen weight, bias, lora_A, lora_B, scaling) of the LM head."""
    lora = isinstance(head, LoRALinear) and not head.merged
    base = head.base_layer if isinstance(head, LoRALinear) else head
    kind = base_kind(base)
    dtype = compute_dtype(base, hidden, kind)
    A = B = None
    scaling = 1.0
    if lora:
        A, B, scaling = cast(head.lora_A.weight, dtype), cast(head.lora_B.weight, dtype), head.scaling
    return cast(hidden, dtype), frozen_weight(base, kind, dtype), cast(base.bias, dtype), A, B, scaling


def _fused_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                   inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
    """The causal LM's forward with the head and loss fused (see the module docstring)."""
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)  # fmt: skip
    if labels is None or not self.training or head_problem(self.lm_head) is not None:
        return type(self).forward(self, labels=labels, logits_to_keep=logits_to_keep, **call, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(**call, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h, weight, bias, A, B, scaling = _head_args(self.lm_head, hidden)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    reduction = "mean" if num_items is None else "sum"
    loss = linear_cross_entropy(h, weight, shift_labels.to(h.device), bias=bias, lora_A=A, lora_B=B,
                                lora_scaling=scaling, ignore_index=IGNORE_INDEX, reduction=reduction,
                                softcap=softcap)  # fmt: skip
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)  # fmt: skip


def install(model: nn.Module) -> None:
    """Give a causal LM the fused head + loss forward (idempotent); raises for other models."""
    if not is_causal_lm(model):
        raise ValueError(f"fused_loss needs a transformers *ForCausalLM model with lm_head, got {type(model).__name__}")
    if getattr(model, _MARK, False):
        return
    # A partial of the module-level function (not a bound method) so the model still pickles
    # (torch.save of the whole model) and deep-copies onto the copy.
    model.forward = functools.partial(_fused_forward, model)
    setattr(model, _MARK, True)


def uninstall(model: nn.Module) -> None:
    """Put the model class's own forward back (no-op when not installed)."""
    if getattr(model, _MARK, False):
        del model.forward
        delattr(model, _MARK)


def installed(model: nn.Module) -> bool:
    """Whether ``install`` was applied to ``model``."""
    return bool(getattr(model, _MARK, False))
