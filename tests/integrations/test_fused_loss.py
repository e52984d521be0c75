"""get_peft_model's fused linear cross-entropy (fused_loss, default on for causal LMs) against the
model's own head + loss: tiny Llama / Qwen2 (dense and NF4), LoRA on lm_head, num_items_in_batch,
Gemma-2 soft-capping, eval mode, unload, and no [tokens, vocab] tensor saved for backward."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.integrations import fused_loss  # noqa: E402
from tests.integrations.helpers import VOCAB, batch, lora_config, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close, saved_tensors  # noqa: E402


def randomize_lora_B(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def fused_and_unfused(model, config):
    fused = fastpeft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    plain = fastpeft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config), fused_loss=False)
    randomize_lora_B(fused)
    fused.train(), plain.train()  # from_pretrained models come in eval mode, where the fused loss is off
    with torch.no_grad():
        trained = dict(plain.named_parameters())
        for name, p in fused.named_parameters():
            if p.requires_grad:
                trained[name].copy_(p)
    return fused, plain


def loss_and_grads(model, inputs, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check(fused, plain, inputs, scale=10, **kw):
    out_f, grads_f = loss_and_grads(fused, inputs, **kw)
    out_p, grads_p = loss_and_grads(plain, inputs, **kw)
    assert out_f.logits is None and out_p.logits is not None  # the fused loss never builds the logits
    assert_close(out_f.loss, out_p.loss, scale=scale)
    assert set(grads_f) == set(grads_p) and grads_f
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=scale, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_loss_and_gradients_equal_the_unfused_model(arch):
    fused, plain = fused_and_unfused(tiny_model(arch), lora_config(arch, lora_dropout=0.0))
    assert fused_loss.installed(fused.base_model.model) and not fused_loss.installed(plain.base_model.model)
    inputs = batch(arch)
    inputs["labels"][0, :4] = -100  # ignored tokens
    check(fused, plain, inputs)
    check(fused, plain, inputs, num_items_in_batch=torch.tensor(17))  # the HF Trainer's gradient accumulation


def test_nf4_model_and_lora_on_the_head(tmp_path):
    config = lora_config("llama", lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    model = tiny_model_4bit("llama", tmp_path)
    fused, plain = fused_and_unfused(model, config)
    assert type(fused.base_model.model.lm_head).__name__ == "LoRALinear"
    check(fused, plain, batch("llama"), scale=30)


def test_equals_peft_and_eval_mode_keeps_the_logits():
    model = tiny_model("llama")
    config = lora_config("llama", lora_dropout=0.0)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    randomize_lora_B(fast)
    reference = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    peft.set_peft_model_state_dict(reference, fast.adapter_state_dict())
    inputs = batch("llama")
    assert_close(fast(**inputs).loss, reference(**inputs).loss, scale=10)
    fast.eval(), reference.eval()
    with torch.no_grad():
        out, ref = fast(**inputs), reference(**inputs)
    assert out.logits is not None
    assert_close(out.logits, ref.logits, scale=10)
    assert_close(out.loss, ref.loss, scale=10)


def test_gemma2_logit_softcapping():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, final_logit_softcapping=3.0)  # fmt: skip
    model = transformers.Gemma2ForCausalLM(cfg)
    fused, plain = fused_and_unfused(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    check(fused, plain, batch("llama"))


def test_saved_for_backward_holds_no_tokens_by_vocab_tensor():
    torch.manual_seed(0)
    vocab = 300  # unlike any other width of the model, so a [tokens, vocab] tensor is recognisable
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))  # fmt: skip
    fused, plain = fused_and_unfused(model, lora_config("llama", lora_dropout=0.0))
    inputs = batch("llama")
    saved_f, out = saved_tensors(lambda: fused(**inputs))
    saved_p, _ = saved_tensors(lambda: plain(**inputs))
    by_vocab = lambda saved: [tuple(t.shape) for t in saved if t.dim() >= 2 and t.shape[-1] == vocab and t.shape[0] != vocab]  # noqa: E731
    assert by_vocab(saved_p) and not by_vocab(saved_f), by_vocab(saved_f)
    out.loss.backward()


def test_opt_out_unload_and_models_that_are_not_causal_lms():
    model = tiny_model("llama")
    fast = fastpeft.get_peft_model(model, lora_config("llama"))
    assert fused_loss.installed(model)
    plain = fast.unload()
    assert not fused_loss.installed(plain) and "forward" not in vars(plain)
    bert = tiny_model("bert")
    before = {n: p.clone() for n, p in bert.named_parameters()}
    with pytest.raises(ValueError, match="fused_loss=True needs a transformers \\*ForCausalLM"):
        fastpeft.get_peft_model(bert, lora_config("bert"), fused_loss=True)
    assert all(torch.equal(p, before[n]) for n, p in bert.named_parameters())
    assert not fused_loss.installed(fastpeft.get_peft_model(tiny_model("bert"), lora_config("bert")).base_model.model)
