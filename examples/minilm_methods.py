"""The fine-tuning methods the main job (finetune_minilm.py) can run, one entry per ``--method``.

A method says which config ``fastpeft.get_peft_model`` gets, whether the base is loaded in NF4 or
dense, what extra inputs its injector needs (FishMask's calibration batches), and how the peer run
is built: peft + bitsandbytes where peft has the method, otherwise the plain-PyTorch practice the
method replaces (for sparse methods: torch AdamW with the gradient multiplied by a dense 0/1 mask).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

import minilm_cloze as _cloze
import minilm_probing as _probing

# BERT's projections: attention q/k/v and output, MLP in and out (all called "dense" or named so).
LORA_TARGETS = ["query", "key", "value", "dense"]


@dataclasses.dataclass
class Method:
    """How the main job runs one method. ``config(args)`` -> the config for get_peft_model;
    ``peer``: "peft" (peft.get_peft_model with the same config and weights), "masked_adamw" (the
    dense-masked reference practice) or None; ``quantize``: load the base in NF4 (else dense fp32);
    ``method_kwargs(model, calibration)`` -> extra keyword arguments for get_peft_model."""

    config: Callable
    peer: Optional[str] = "peft"
    quantize: bool = True
    lr: float = 2e-3
    method_kwargs: Optional[Callable] = None
    optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    describe: str = ""
    # task(args) -> how the model, inputs and logits are built (finetune_minilm.Task); None: sequence
    # classification with a new head. Cloze methods (PET, WARP) set it (minilm_cloze.py).
    task: Optional[Callable] = None
    # after_training(model) -> dict of extra results (adaptable adapters: prune and report the kept layers).
    after_training: Optional[Callable] = None


def _lora(args):
    import peft

    return peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip


def _ia3(args):
    import peft

    # peft's defaults for BERT: scale keys, values and the FFN output (input side of output.dense).
    return peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                          modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip


def _prompt(args):
    import peft

    return peft.PromptTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="SEQ_CLS")


def _prefix(args):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="SEQ_CLS")


def _adapter(args):
    import fastpeft

    # Pfeiffer placement (one adapter after each FFN output), as the adapters library's SeqBnConfig.
    return fastpeft.BottleneckAdapterConfig(reduction_factor=16, non_linearity="relu", placement="pfeiffer",
                                            modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip


def _adaptable(args):
    import fastpeft

    # Pfeiffer placement as "adapter", with the rational activation (from leaky ReLU) and the switches.
    return fastpeft.AdaptableAdapterConfig(reduction_factor=16, placement="pfeiffer", modules_to_save=["classifier"],
                                           task_type="SEQ_CLS")  # fmt: skip


def _prune_adaptable(model) -> dict:
    import fastpeft

    return {"pruned": fastpeft.prune_adaptable_adapters(model)}


def _bitfit(args):
    import fastpeft

    return fastpeft.BitFitConfig(which="all", modules_to_save=["classifier"], task_type="SEQ_CLS")


def _fishmask(args):
    import fastpeft

    return fastpeft.FishMaskConfig(keep_ratio=args.keep_ratio, num_samples=64, modules_to_save=["classifier"],
                                   task_type="SEQ_CLS")  # fmt: skip


# Sparse methods train entries of the frozen weights in place; weight decay would be the one
# difference from the dense-masked practice (it decays untrained entries), so both runs use none.
NO_DECAY = {"weight_decay": 0.0}

METHODS = {
    "lora": Method(_lora, describe="LoRA on every attention and MLP projection"),
    "ia3": Method(_ia3, lr=1e-2, describe="(IA)^3 vectors on keys, values and the FFN output"),
    "prompt": Method(_prompt, lr=3e-2, describe="prompt tuning: virtual token embeddings"),
    "prefix": Method(_prefix, lr=1e-2, describe="prefix tuning: per-layer prefix keys/values"),
    "bitfit": Method(_bitfit, peer="masked_adamw", lr=1e-2, optimizer_kwargs=NO_DECAY,
                     describe="BitFit: every bias term"),
    # FishMask writes into the weights themselves, which a 4-bit weight cannot take: dense base.
    "fishmask": Method(_fishmask, peer="masked_adamw", quantize=False, lr=2e-3, optimizer_kwargs=NO_DECAY,
                       method_kwargs=lambda model, calibration: {"batches": calibration},
                       describe="FishMask: the weight entries with the largest Fisher information"),
    # No peer: the adapters library does not run with transformers 5.17.
    "adapter": Method(_adapter, peer=None, describe="Pfeiffer bottleneck adapters after every FFN"),
    # Peer: the same model with every adapter layer run as the plain-PyTorch reference (rational in
    # elementwise ops, switch mix by torch.lerp), from the same weights and the same Gumbel draws.
    "adaptable": Method(_adaptable, peer="plain_adaptable", after_training=_prune_adaptable,
                        describe="adaptable adapters: Pfeiffer adapters with rational activations and "
                                 "Gumbel-softmax layer switches, pruned after training"),
    # Cloze methods (minilm_cloze.py): MiniLM loaded as a bare BertModel, label-word / class scores at a
    # [MASK]; peers score the same model the plain way (full-vocabulary logits / per-example WARP).
    "pet": Method(_cloze.pet_config, lr=2e-3, task=_cloze.PetTask,
                  describe="PET / LM-BFF cloze classification, LoRA on the NF4 encoder, label words at [MASK]"),
    "warp": Method(_cloze.warp_config, peer="plain_warp", quantize=False, lr=3e-2, task=_cloze.WarpTask,
                   describe="WARP: prompt tokens around the input and [MASK], class embeddings; frozen encoder"),
    # Probing (minilm_probing.py): frozen MiniLM, linear head on layer 4's mean-pooled output; the peer is the
    # plain practice (frozen parameters, full forward with output_hidden_states, same head).
    "probing": Method(_probing.probing_config, peer="frozen_encoder", quantize=False, lr=1e-2,
                      describe="probing: frozen encoder (no_grad, stopped at layer 4), trained linear head"),
    # MAD-X: invertible adapter on the embeddings + Pfeiffer language adapters; no LM head on MiniLM, so no
    # inverse (docs/invertible_adapter.md). No peer: the adapters library does not run with transformers 5.17.
    "madx": Method(_probing.madx_config, peer=None,
                   describe="MAD-X: NICE invertible adapter on the embeddings + Pfeiffer bottleneck adapters"),
}


def peer_model(method: Method, base: nn.Module, fast_model, config):
    """The comparison run's model, starting from fastpeft's exact adapter weights. ``base`` is a
    copy of the model taken before fastpeft touched it."""
    if method.peer == "peft":
        import peft

        peer = peft.get_peft_model(base, copy.deepcopy(config))
        peft.set_peft_model_state_dict(peer, {k: v.detach() for k, v in fast_model.adapter_state_dict().items()})
        return peer
    if method.peer == "masked_adamw":
        from fastpeft.integrations.sparse import trained_mask

        # The practice sparse fine-tuning code uses: the same entries trainable, every parameter
        # holding one gets a dense gradient, multiplied by a dense 0/1 mask before AdamW.
        mask = trained_mask(fast_model)
        for name, p in base.named_parameters():
            p.requires_grad_(name in mask)
        base._dense_masks = {name: mask[name] for name in mask}
        return base
    if method.peer == "plain_adaptable":
        import fastpeft
        from fastpeft.integrations.adaptable_adapter import adaptable_adapters
        from fastpeft.nn.adaptable_adapter import AdaptableAdapterReference

        peer = fastpeft.get_peft_model(base, copy.deepcopy(config))
        fast_params = dict(fast_model.named_parameters())
        with torch.no_grad():  # the trained tensors (adapters, switches, classifier); the base is a copy
            for name, p in peer.named_parameters():
                if p.requires_grad:
                    p.copy_(fast_params[name])
        for _, a in adaptable_adapters(peer):
            a.__class__ = AdaptableAdapterReference
        return peer
    if method.peer == "frozen_encoder":
        return _probing.probing_peer(base, fast_model, config)
    raise ValueError(f"unknown peer {method.peer!r}")


def peer_optimizer(method: Method, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if method.peer != "masked_adamw":
        return torch.optim.AdamW(params, lr=lr, **method.optimizer_kwargs)
    from fastpeft.optim.masks import dense_mask_of

    for name, p in model.named_parameters():
        if name in model._dense_masks:
            dense = dense_mask_of(model._dense_masks[name], p.detach())
            p.register_hook(lambda grad, dense=dense: grad * dense)
    return torch.optim.AdamW(params, lr=lr, **method.optimizer_kwargs)
