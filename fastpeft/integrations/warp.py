"""WARP through ``fastpeft.get_peft_model(model, fastpeft.WarpConfig(...))``.

The encoder stays frozen. The FastPeftModel owns ``warp`` (a ``WarpPrompt`` and a
``WarpVerbalizer``, ``fastpeft.nn.warp``); its forward takes the tokenizer's usual
``input_ids`` / ``attention_mask`` (``[CLS] x [SEP]``, right-padded) and an optional per-example
``prompt_index``, builds ``[CLS] P_1..P_k x P_k+1..P_m [MASK] [SEP]``, runs the body, and scores the
mask position's hidden state (through ``cls.predictions.transform`` on a ``*ForMaskedLM``; as is on
a bare encoder such as MiniLM) against the class embeddings: the output's ``logits`` are [B, C],
``loss`` the cross-entropy when ``labels`` are given. No vocabulary-sized logits are made.

Checkpoints (fastpeft format, safetensors through ``save_pretrained`` / ``fastpeft.from_pretrained``):
``warp.prompt_embeddings`` [N * m, E], ``warp.class_embeddings`` [C, H] and, with ``class_bias``,
``warp.class_bias`` [C].
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from fastpeft.integrations.registry import Injection, register_method
from fastpeft.nn.warp import WarpPrompt, WarpVerbalizer
from fastpeft.prompting.mlm import mask_hidden_states, split_masked_lm, transformed

PEFT_TYPE = "FASTPEFT_WARP"
PROMPT_KEY, CLASS_KEY, BIAS_KEY = "warp.prompt_embeddings", "warp.class_embeddings", "warp.class_bias"


def _positive_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"WarpConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass
class WarpConfig:
    """WARP (Hambardzumyan et al. 2021): ``num_before`` prompt tokens before the input,
    ``num_after`` between it and the ``[MASK]``, a bank of ``num_prompts`` such prompts (per-example
    ``prompt_index``), and one class embedding per label initialised from ``label_token_ids`` (one
    token id per class: its decoder row, or word-embedding row on a bare encoder; with
    ``class_bias`` also a bias initialised from the decoder bias, or zeros).

    ``prompt_init``: "mask" (the mask token's embedding, WARP's choice), "vocab" or "random".
    ``mask_token_id`` / ``pad_token_id``: the tokenizer's. ``WarpConfig.from_tokenizer(tokenizer,
    ["great", "terrible"], ...)`` fills the ids and checks every label word is one token."""

    label_token_ids: list
    mask_token_id: int
    num_before: int = 4
    num_after: int = 4
    num_prompts: int = 1
    prompt_init: str = "mask"
    class_bias: bool = True
    pad_token_id: int = 0
    task_type: Optional[str] = None
    peft_type: str = PEFT_TYPE

    def __post_init__(self):
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"WarpConfig has peft_type {PEFT_TYPE!r}, got {self.peft_type!r}")
        ids = self.label_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"WarpConfig.label_token_ids must be a non-empty list of token ids, got {ids!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"WarpConfig.label_token_ids must hold one token id (int >= 0) per class, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"WarpConfig.label_token_ids has duplicates: {ids!r} (two classes would start equal)")
        self.label_token_ids = list(ids)
        _positive_int(self.mask_token_id, "mask_token_id", 0)
        _positive_int(self.pad_token_id, "pad_token_id", 0)
        _positive_int(self.num_before, "num_before", 0)
        _positive_int(self.num_after, "num_after", 0)
        _positive_int(self.num_prompts, "num_prompts", 1)
        if self.num_before + self.num_after < 1:
            raise ValueError("WarpConfig: num_before + num_after must be >= 1")
        if self.prompt_init not in ("mask", "vocab", "random"):
            raise ValueError(f"WarpConfig.prompt_init must be 'mask', 'vocab' or 'random', got {self.prompt_init!r}")
        if not isinstance(self.class_bias, bool):
            raise ValueError(f"WarpConfig.class_bias must be a bool, got {self.class_bias!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer, label_words, **kwargs) -> "WarpConfig":
        """A config whose classes start from ``label_words`` (one word per class, each one token of
        ``tokenizer``; a dict's values or a list), with the tokenizer's mask and pad ids."""
        from fastpeft.prompting.verbalizer import Verbalizer

        verbalizer = Verbalizer(label_words, tokenizer)
        if verbalizer.num_words != len(verbalizer):
            raise ValueError("WarpConfig.from_tokenizer takes exactly one label word per class")
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; WARP needs one")
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
        return cls(label_token_ids=verbalizer.token_ids.tolist(), mask_token_id=tokenizer.mask_token_id, **kwargs)

    @property
    def num_virtual_tokens(self) -> int:
        """m = num_before + num_after, the prompt tokens per example."""
        return self.num_before + self.num_after

    def to_dict(self) -> dict:
        """The JSON-able fields (peft_type included), as saved in ``adapter_config.json``."""
        return dataclasses.asdict(self)


class WarpModules(nn.Module):
    """What WARP adds: ``prompt`` (WarpPrompt) and ``verbalizer`` (WarpVerbalizer)."""

    def __init__(self, prompt: WarpPrompt, verbalizer: WarpVerbalizer):
        super().__init__()
        self.prompt, self.verbalizer = prompt, verbalizer


def build_warp_modules(model: nn.Module, config: WarpConfig) -> WarpModules:
    """The prompt and class embeddings for ``model``, initialised as ``config`` says. Raises
    ValueError (nothing changed) for unsupported models or token ids outside the vocabulary."""
    parts = split_masked_lm(model)
    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0]
    bad = [i for i in [*config.label_token_ids, config.mask_token_id, config.pad_token_id] if i >= vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the model's vocabulary of {vocab}")
    device = embeddings.weight.device
    prompt = WarpPrompt(config.num_before, config.num_after, embeddings.weight.shape[1], config.mask_token_id,
                        num_prompts=config.num_prompts, init=config.prompt_init, word_embeddings=embeddings,
                        pad_token_id=config.pad_token_id, device=device)  # fmt: skip
    prompt.float()
    ids = torch.tensor(config.label_token_ids, device=parts.weight.device)
    with torch.no_grad():
        rows = parts.weight[ids].float()
        bias = parts.bias[ids].float() if parts.bias is not None else None
    return WarpModules(prompt, WarpVerbalizer(rows, bias, use_bias=config.class_bias))


def warp_forward(modules: WarpModules, parts):
    """The FastPeftModel forward: WARP inputs -> body -> mask hidden -> class scores."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    def forward(model: nn.Module, input_ids=None, attention_mask=None, token_type_ids=None, prompt_index=None,
                labels=None):  # fmt: skip
        # token_type_ids: the WARP sequence is one segment (zeros); the tokenizer's are not used.
        if input_ids is None:
            raise ValueError("WARP needs input_ids (the tokenizer's [CLS] x [SEP], right-padded)")
        inputs = modules.prompt(model.get_input_embeddings(), input_ids, attention_mask, prompt_index)
        mask = inputs["attention_mask"]
        hidden = mask_hidden_states(parts, inputs["mask_positions"], inputs_embeds=inputs["inputs_embeds"],
                                    attention_mask=mask, token_type_ids=torch.zeros_like(mask))  # fmt: skip
        logits = modules.verbalizer(transformed(parts, hidden))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    return forward


def _inject(model: nn.Module, config: WarpConfig) -> Injection:
    parts = split_masked_lm(model)
    modules = build_warp_modules(model, config)
    for p in modules.parameters():
        p.requires_grad_(True)

    def state_dict() -> dict:
        out = {PROMPT_KEY: modules.prompt.soft_prompt.embedding.weight, CLASS_KEY: modules.verbalizer.class_embeddings}
        if modules.verbalizer.bias is not None:
            out[BIAS_KEY] = modules.verbalizer.bias
        return out

    return Injection(parameter_names=[], unload=lambda: model, state_dict=state_dict,
                     forward=warp_forward(modules, parts), owned_modules={"warp": modules})  # fmt: skip


register_method(PEFT_TYPE, _inject, WarpConfig)

__all__ = ["WarpConfig", "WarpModules", "build_warp_modules", "warp_forward"]
