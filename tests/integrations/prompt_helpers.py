"""peft / fastpeft prompt-learning twins with the same weights, for tests/integrations/test_prompt_learning_*.py."""

import copy

import peft
import torch

import fastpeft
from tests.integrations.helpers import VOCAB

P = 4
KINDS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection"]


def task_of(arch: str) -> str:
    return "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"


def config(kind: str, arch: str = "llama", **kwargs):
    """A peft prompt-learning config of ``kind`` for ``arch``'s task."""
    kwargs.setdefault("task_type", task_of(arch))
    kwargs.setdefault("num_virtual_tokens", P)
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(**kwargs)
    if kind.startswith("p_tuning"):
        kind = kind.removeprefix("p_tuning_").upper()
        return peft.PromptEncoderConfig(encoder_hidden_size=24, encoder_reparameterization_type=kind, **kwargs)
    if kind == "prefix_projection":
        return peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=24, **kwargs)
    return peft.PrefixTuningConfig(**kwargs)


def prompt_module(fast):
    """fastpeft's prompt module: ``prompt_encoder["default"]`` or the patched model's prefix encoder."""
    if "prompt_encoder" in fast._modules:
        return fast.prompt_encoder["default"]
    return fast.base_model.model.fastpeft_prefix_encoder


def twins(model, cfg):
    """(peft model, fastpeft model) over copies of ``model`` with the same prompt-encoder weights
    (a SEQ_CLS classifier starts as the base model's in both)."""
    theirs = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    ours = fastpeft.get_peft_model(copy.deepcopy(model), cfg)
    prompt_module(ours).load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return theirs, ours


def common_name(name: str) -> str:
    """A trainable parameter's name, the same for peft's and fastpeft's models."""
    name = name.replace(".modules_to_save.default", "")
    for prefix in ("prompt_encoder.default.", "base_model.model.fastpeft_prefix_encoder."):
        if name.startswith(prefix):
            return "prompt." + name[len(prefix) :]
    return name.removeprefix("base_model.model.").removeprefix("base_model.")


def run(model, inputs):
    """(logits, loss, {common name: grad}) of one forward/backward (the logits of a model with the
    fused loss from a second forward without labels)."""
    model.zero_grad(set_to_none=True)
    rng = torch.get_rng_state()
    out = model(**inputs)
    out.loss.backward()
    grads = {common_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = out.logits
    if logits is None:  # fastpeft's fused loss (causal LMs) builds no logits: a forward without labels does
        with torch.no_grad(), torch.random.fork_rng():
            torch.set_rng_state(rng)  # the same dropout masks as the forward with labels
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return logits.detach(), out.loss.detach(), grads


def batch(arch: str, seed: int = 1, batch_size: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # right padding
    labels = torch.randint(0, 3, (batch_size,), generator=g) if arch == "bert" else input_ids.masked_fill(
        attention_mask == 0, -100)  # fmt: skip
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def tiny_tokenizer(folder) -> str:
    """A word-level tokenizer over VOCAB made-up words, saved offline; returns its folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    return str(folder)
