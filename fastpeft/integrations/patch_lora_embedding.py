"""``fastpeft.patch`` for peft's ``lora.Embedding`` layers: the static and per-forward checks and the
fused forward (``fastpeft.nn.lora_embedding.lora_embedding_forward`` with the layer's own
parameters). Part of the LoRA family in ``fastpeft.integrations.patch``."""

from __future__ import annotations

from torch import nn

from fastpeft.nn.lora_embedding import embedding_base_problem, lora_embedding_forward


_EMBEDDING = None


def embedding_class() -> type:
    """peft's ``lora.Embedding`` (imported once)."""
    global _EMBEDDING
    if _EMBEDDING is None:
        from peft.tuners.lora.layer import Embedding

        _EMBEDDING = Embedding
    return _EMBEDDING


def reason_not_fusable(module):
    """Why fastpeft can never run this peft embedding LoRA layer (its base), or None."""
    from fastpeft.integrations.patch import tuner_layer_class

    base = module.base_layer
    if isinstance(base, tuner_layer_class()):
        return f"base layer is another adapter layer ({type(base).__name__}: mixed adapter types)"
    problem = embedding_base_problem(base)
    return None if problem is None else f"base layer: {problem}"


def forward_problem(layer, args=(), kwargs=None):
    """(adapter, None) when the fused embedding forward computes exactly what peft's would for this
    call, else (None, reason)."""
    from fastpeft.integrations.patch import common_forward_problem, single_plain_adapter

    modules = layer._modules
    base = modules["base_layer"]
    reason = common_forward_problem(layer, args, kwargs or {}, base)
    if reason is not None:
        return None, reason
    reason = reason_not_fusable(layer)  # the base may have been swapped or changed
    if reason is not None:
        return None, reason
    adapter, reason = single_plain_adapter(layer, modules["lora_embedding_A"]._parameters)
    if reason is not None:
        return None, reason
    if layer.__dict__.get("input_fns", {}).get(adapter) is not None or layer.__dict__.get("output_fns", {}).get(adapter):
        return None, "tensor-parallel embedding LoRA (input / output functions)"
    return adapter, None


def fused_forward(self, x, *args, **kwargs):
    """A patched ``lora.Embedding``'s forward: the fused path when ``forward_problem`` allows it,
    else peft's own forward."""
    from fastpeft.integrations.patch import note_fallback, note_fused

    adapter, reason = forward_problem(self, args, kwargs)
    if reason is not None:
        note_fallback(self, reason)
        return type(self).forward(self, x, *args, **kwargs)
    note_fused(self)
    return lora_embedding_forward(self.base_layer, self.lora_embedding_A[adapter], self.lora_embedding_B[adapter],
                                  self.scaling[adapter], x)  # fmt: skip


def is_embedding_layer(module: nn.Module) -> bool:
    """Exactly peft's ``lora.Embedding`` (a subclass may compute something else)."""
    return type(module) is embedding_class()
