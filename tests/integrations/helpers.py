"""Tiny transformers models built from configs, and peft/fastpeft twins with the same weights."""

import copy

import peft
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import fastpeft

VOCAB = 128


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    if arch == "qwen2":  # q/k/v projections with bias, GQA
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    if arch == "bert":
        # No hidden/attention dropout: twin models must see the same activations in train mode.
        return BertForSequenceClassification(
            BertConfig(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
        )
    raise ValueError(arch)


def tiny_model_4bit(arch: str, tmp_path, seed: int = 0):
    """The tiny model saved and reloaded with its linear layers in NF4 (bitsandbytes, on the CPU)."""
    folder = tmp_path / f"{arch}-dense"
    if not folder.exists():
        tiny_model(arch, seed).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "lm_head"])  # fmt: skip
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "bert": BertForSequenceClassification}[arch]
    return cls.from_pretrained(folder, quantization_config=quant, device_map={"": "cpu"})


def tiny_model_8bit(arch: str, tmp_path, seed: int = 0):
    """The tiny model saved and reloaded with its linear layers in LLM.int8() (bitsandbytes
    Linear8bitLt with int8 weights, on the CPU)."""
    folder = tmp_path / f"{arch}-dense"
    if not folder.exists():
        tiny_model(arch, seed).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier", "lm_head"])
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "bert": BertForSequenceClassification}[arch]
    return cls.from_pretrained(folder, quantization_config=quant, device_map={"": "cpu"})


def lora_config(arch: str, **kwargs):
    if arch == "bert":
        kwargs.setdefault("target_modules", ["query", "key", "value", "dense"])
        kwargs.setdefault("task_type", "SEQ_CLS")
    else:
        kwargs.setdefault("target_modules", "all-linear")
        kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("r", 8)
    kwargs.setdefault("lora_alpha", 16)
    return peft.LoraConfig(**kwargs)


def randomize_lora_B(model):
    """peft and fastpeft start B at zero; tests need adapters that change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def peft_to_fastpeft_name(name: str) -> str:
    """peft's parameter name as fastpeft names it (no adapter name; no torch.compile wrapper prefix;
    DoRA's magnitude under its checkpoint key)."""
    name = name.removeprefix("_orig_mod.").replace(".modules_to_save.default", "").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")  # DoRA: peft's checkpoint key


def twins(model, config, **fast_kwargs):
    """(peft model, fastpeft model) over copies of ``model`` with identical adapter weights."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    randomize_lora_B(peft_model)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), config, **fast_kwargs)
    fast._assign_adapter(peft.get_peft_model_state_dict(peft_model))
    return peft_model, fast


def batch(arch: str, seed: int = 1, batch_size: int = 3, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # some padding
    if arch == "bert":
        labels = torch.randint(0, 3, (batch_size,), generator=g)
    else:
        labels = input_ids.clone()
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(model, inputs):
    """(logits, loss, gradients by fastpeft name) of one training step. A causal LM with fastpeft's
    fused loss returns no logits with labels: they come from a second forward without labels."""
    model.zero_grad(set_to_none=True)
    rng = torch.get_rng_state()
    out = model(**inputs)
    out.loss.backward()
    grads = {peft_to_fastpeft_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = out.logits
    if logits is None:
        with torch.no_grad(), torch.random.fork_rng():
            torch.set_rng_state(rng)  # the same dropout masks as the forward with labels
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return logits.detach(), out.loss.detach(), grads


def recorded_ops(model, inputs) -> list:
    """Names of the operators ``model(**inputs)`` dispatches (a TorchDispatchMode sees the top-level
    calls: a fused layer shows as its fastpeft op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        model(**inputs)
    return names


def assert_parity(reference, fast, inputs, scale=10.0) -> dict:
    """Logits, loss and every gradient of ``fast`` equal ``reference``'s (fp32 tolerance x ``scale``)
    on ``inputs``; returns fast's gradients by name."""
    from tests.utils import assert_close

    logits_p, loss_p, grads_p = loss_and_grads(reference, inputs)
    logits_f, loss_f, grads_f = loss_and_grads(fast, inputs)
    assert_close(logits_f, logits_p, scale=scale)
    assert_close(loss_f, loss_p, scale=scale)
    assert set(grads_f) == set(grads_p) and grads_f
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=scale, msg=name)
    return grads_f


def unlabelled(inputs: dict) -> dict:
    """``inputs`` without labels: a causal LM with fastpeft's fused loss returns logits then."""
    return {k: v for k, v in inputs.items() if k != "labels"}


def assert_checkpoints_both_ways(base, peft_model, fast, inputs, tmp_path, scale=10.0) -> None:
    """``fast``'s checkpoint loads into peft and ``peft_model``'s into fastpeft (each over a copy of
    ``base``), and each loaded model gives its source's logits on ``inputs`` in eval mode (all four
    models are left in eval mode). Checkpoints go to ``tmp_path / "fast"`` and ``/ "peft"``."""
    from tests.utils import assert_close

    fast.save_pretrained(tmp_path / "fast")
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast")
    fast.eval()
    loaded_peft.eval()
    assert_close(loaded_peft(**inputs).logits, fast(**inputs).logits, scale=scale)

    peft_model.save_pretrained(tmp_path / "peft")
    loaded_fast = fastpeft.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    peft_model.eval()
    loaded_fast.eval()
    assert_close(loaded_fast(**inputs).logits, peft_model(**inputs).logits, scale=scale)
