"""fastpeft.get_peft_model with peft's PromptTuningConfig, PromptEncoderConfig and PrefixTuningConfig,
against peft on tiny Llama, Qwen2 (CAUSAL_LM) and BERT (SEQ_CLS) models, dense and NF4."""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from tests.integrations.helpers import tiny_model, tiny_model_4bit  # noqa: E402
from tests.integrations.prompt_helpers import KINDS, batch, config, prompt_module, run, twins  # noqa: E402
from tests.utils import assert_close  # noqa: E402

ARCHS = ["llama", "qwen2", "bert"]


def check_parity(theirs, ours, arch, kind, scale=10):
    inputs = batch(arch)
    logits_p, loss_p, grads_p = run(theirs, inputs)
    logits_f, loss_f, grads_f = run(ours, inputs)
    assert logits_f.shape == logits_p.shape
    if arch != "bert" and kind.startswith("prefix"):
        keep = inputs["attention_mask"].bool()  # padded query rows are garbage in both
        logits_f, logits_p = logits_f[keep], logits_p[keep]
    assert_close(logits_f, logits_p, scale=scale)
    assert_close(loss_f, loss_p, scale=scale)
    assert set(grads_f) == set(grads_p) and any(k.startswith("prompt.") for k in grads_f)
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=scale, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_logits_and_gradients_as_peft(arch, kind):
    theirs, ours = twins(tiny_model(arch), config(kind, arch))
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    assert not any(p.requires_grad for n, p in ours.base_model.model.named_parameters()
                   if "prefix_encoder" not in n and "classifier" not in n)  # fmt: skip
    check_parity(theirs, ours, arch, kind)


@pytest.mark.parametrize("arch,kind", [("llama", "prompt_tuning"), ("llama", "prefix_projection"),
                                       ("bert", "p_tuning_mlp"), ("bert", "prefix")])  # fmt: skip
def test_nf4_parity_with_peft(arch, kind, tmp_path):
    model = tiny_model_4bit(arch, tmp_path)
    theirs, ours = twins(model, config(kind, arch))
    check_parity(theirs, ours, arch, kind)


TRAINING_CASES = [("llama", "prompt_tuning"), ("qwen2", "prefix_projection"), ("llama", "p_tuning_lstm"),
                  ("bert", "p_tuning_mlp"), ("bert", "prefix")]


@pytest.mark.parametrize("arch,kind", TRAINING_CASES)
def test_adamw_steps_give_peft_loss_curve(arch, kind):
    theirs, ours = twins(tiny_model(arch), config(kind, arch))
    inputs = batch(arch)
    opt_p = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_f = ours.create_optimizer(lr=1e-2)
    curves = ([], [])
    for _ in range(4):
        for model, opt, curve in ((theirs, opt_p, curves[0]), (ours, opt_f, curves[1])):
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert curves[1] == pytest.approx(curves[0], rel=1e-5, abs=1e-6)
    assert curves[1][-1] < curves[1][0]


def test_parameters_to_and_state_dict_see_the_prompt():
    _, ours = twins(tiny_model("llama"), config("p_tuning_mlp"))
    module = prompt_module(ours)
    assert {id(p) for p in module.parameters()} <= {id(p) for p in ours.parameters()}
    assert any(k.startswith("prompt_encoder.default.mlp_head") for k in ours.state_dict())
    ours.to(torch.float64)
    assert module.embedding.weight.dtype == torch.float64
    _, prefix = twins(tiny_model("llama"), config("prefix"))
    assert {id(p) for p in prompt_module(prefix).parameters()} <= {id(p) for p in prefix.parameters()}


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_mlp", "prefix", "prefix_projection"])
def test_generate_matches_peft_and_unload_restores(kind):
    base = tiny_model("llama")
    theirs, ours = twins(base, config(kind))
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    plain = ours.unload()
    assert "prepare_inputs_for_generation" not in plain.__dict__ and not hasattr(plain, "fastpeft_prefix_encoder")
    assert plain.config._attn_implementation == base.config._attn_implementation
    base_out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), base_out)
    assert torch.equal(plain(input_ids=ids).logits, base(input_ids=ids).logits)


def test_positional_arguments_inputs_embeds_and_token_type_ids():
    theirs, ours = twins(tiny_model("bert"), config("prompt_tuning", "bert"))
    inputs = batch("bert")
    types = torch.zeros_like(inputs["input_ids"])
    types[:, 5:] = 1
    want = theirs(**inputs, token_type_ids=types).logits
    assert_close(ours(**inputs, token_type_ids=types).logits, want)
    assert_close(ours(inputs["input_ids"], inputs["attention_mask"], token_type_ids=types).logits, want)
    embeds = ours.get_input_embeddings()(inputs["input_ids"])
    assert_close(ours(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], token_type_ids=types).logits, want)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(attention_mask=inputs["attention_mask"])
    theirs, ours = twins(tiny_model("llama"), config("prompt_tuning"))
    inputs = batch("llama")
    out = ours(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"], output_hidden_states=True)
    assert out.logits is None  # the fused loss (default for causal LMs) builds none
    assert_close(out.loss, theirs(**inputs).loss)
    assert len(out.hidden_states) == 3  # the extra keyword reached the model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(**inputs, position_ids=torch.arange(9).expand(3, -1)).loss
    assert any("position_ids are not supported" in str(w.message) for w in caught)
    assert_close(got, theirs(**inputs).loss)


def test_prefix_unload_is_bit_identical_and_gradient_checkpointing_works():
    base = tiny_model("llama")
    inputs = batch("llama")
    before = base(**inputs).logits
    _, ours = twins(base, config("prefix_projection"))
    ours.train()
    loss = ours(**inputs).loss
    loss.backward()
    want = [p.grad.clone() for p in prompt_module(ours).parameters()]
    ours.zero_grad()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours(**inputs).loss.backward()
    for p, g in zip(prompt_module(ours).parameters(), want):
        assert_close(p.grad, g, scale=10)
    plain = ours.unload()
    plain.gradient_checkpointing_disable()
    plain.eval()
    assert torch.equal(plain(**inputs).logits, before)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("kind", ["prefix", "prefix_projection"])
def test_prefix_with_attention_dropout_matches_peft_for_the_same_seed(arch, kind):
    # MiniLM / BERT train with attention_probs_dropout_prob=0.1: the patch falls back to peft's
    # computation (concat + SDPA with dropout), so the same seed draws the same dropout masks.
    model = tiny_model(arch)
    model.config.attention_probs_dropout_prob = model.config.attention_dropout = 0.2
    for m in model.modules():
        if type(m).__name__ == "BertSelfAttention":
            m.dropout.p = 0.2
        elif hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.2
    theirs, ours = twins(model, config(kind, arch))
    theirs.train()
    ours.train()
    inputs = batch(arch)
    torch.manual_seed(5)
    logits_p, loss_p, grads_p = run(theirs, inputs)
    torch.manual_seed(5)
    logits_f, loss_f, grads_f = run(ours, inputs)
    torch.manual_seed(6)
    assert run(ours, inputs)[1] != loss_f  # dropout is on
    if arch != "bert":
        keep = inputs["attention_mask"].bool()
        logits_f, logits_p = logits_f[keep], logits_p[keep]
    assert_close(logits_f, logits_p, scale=10)
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=10, msg=name)
