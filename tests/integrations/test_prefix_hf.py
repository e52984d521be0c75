"""Prefix tuning in HF transformers through fastpeft's attention function, against peft's
PrefixTuningConfig on tiny Llama / Qwen2 / Mistral models built from configs (GQA)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fastpeft.integrations.prefix_attention as integration
from fastpeft.integrations.prefix_attention import ATTENTION_NAME, apply_prefix_tuning
from fastpeft.nn import PrefixEncoder

peft = pytest.importorskip("peft")

P = 5
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny(family="llama", attn_implementation="sdpa"):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn_implementation)  # fmt: skip
    return model_cls(config).eval()


def batch(B=3, S=7, padding="right"):
    ids = torch.randint(0, 96, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if padding == "right":
        mask[1, -3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    return ids, mask


def paired(family="llama", attn_implementation="sdpa", projection=False):
    """The same prefix weights in a peft PrefixTuning model and in a fastpeft-patched copy."""
    base = tiny(family, attn_implementation)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24 if projection else None)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    encoder = PrefixEncoder.for_model(base.config, P, prefix_projection=projection, encoder_hidden_size=24)
    encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ours = copy.deepcopy(base)
    for p in ours.parameters():
        p.requires_grad_(False)
    return base, theirs, ours, encoder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("projection", [False, True])
def test_same_logits_as_peft(family, attn_implementation, projection):
    _, theirs, ours, encoder = paired(family, attn_implementation, projection)
    ids, mask = batch()
    want = theirs(input_ids=ids, attention_mask=mask).logits
    with apply_prefix_tuning(ours, encoder):
        got = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions hold garbage in both
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_left_padding_and_no_mask():
    _, theirs, ours, encoder = paired()
    with apply_prefix_tuning(ours, encoder):
        ids, mask = batch(padding="left")
        # Left-padded rows see no sequence key at all in the first positions: only the prefix.
        got = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_moves_the_loss_like_peft(family):
    _, theirs, ours, encoder = paired(family, projection=True)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=1.0)
    opt_ours = torch.optim.SGD(encoder.parameters(), lr=1.0)
    with apply_prefix_tuning(ours, encoder):
        for step in range(3):
            losses = []
            for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
                opt.zero_grad()
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5), f"step {step}"


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(use_reentrant):
    # peft's cache-held prefix is dropped by HF under checkpointing; ours is read inside the layer.
    _, _, ours, encoder = paired(projection=True)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    index = torch.tensor([0, 0, 0])
    ours.train()
    with apply_prefix_tuning(ours, encoder):
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels, prefix_index=index).loss
        loss.backward()
        want = [p.grad.clone() for p in encoder.parameters()]
        encoder.zero_grad()
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        ours.enable_input_require_grads()
        loss_ckpt = ours(input_ids=ids, attention_mask=mask, labels=labels, prefix_index=index).loss
        loss_ckpt.backward()
    assert loss_ckpt.item() == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip(encoder.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_peft_and_keeps_the_prefix_out_of_the_cache(family):
    _, theirs, ours, encoder = paired(family)
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.ones_like(ids)
    want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with apply_prefix_tuning(ours, encoder):
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        cache = ours(input_ids=ids, use_cache=True).past_key_values
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1]  # the prefix was not copied into the cache


def test_bank_of_prefixes_per_example():
    base = tiny()
    encoder = PrefixEncoder.for_model(base.config, P, num_prefixes=3)
    ids, mask = batch()
    index = torch.tensor([2, 0, 1])
    with apply_prefix_tuning(base, encoder) as patch:
        mixed = base(input_ids=ids, attention_mask=mask, prefix_index=index).logits
        for b in range(3):  # each example as if alone with its own set
            alone = base(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], prefix_index=index[b : b + 1]).logits
            torch.testing.assert_close(mixed[b][mask[b].bool()], alone[0][mask[b].bool()], rtol=1e-5, atol=1e-5)
        generated = patch.generate(ids, attention_mask=mask, prefix_index=index, max_new_tokens=3, do_sample=False)
        for b in range(3):
            one = patch.generate(ids[b : b + 1], attention_mask=mask[b : b + 1], prefix_index=index[b : b + 1],
                                 max_new_tokens=3, do_sample=False)  # fmt: skip
            if mask[b].all():  # padded prompts continue differently alone (different cache length)
                assert torch.equal(generated[b], one[0])
        beams = patch.generate(ids, attention_mask=mask, prefix_index=index, max_new_tokens=2, num_beams=2,
                               num_return_sequences=2, do_sample=False)  # fmt: skip
        assert beams.shape[0] == 6


def test_every_layer_runs_the_op(monkeypatch):
    calls = []
    real = integration.prefix_attention
    monkeypatch.setattr(integration, "prefix_attention", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    base = tiny()
    encoder = PrefixEncoder.for_model(base.config, P, num_prefixes=2)
    with apply_prefix_tuning(base, encoder):
        base(input_ids=torch.randint(0, 96, (2, 4)), prefix_index=torch.tensor([1, 0]))
    assert calls == [(2, 2, P, 16)] * 2  # two layers; the bank, never a per-example copy


def test_patch_is_reversible():
    base = tiny()
    ids, mask = batch()
    before = base(input_ids=ids, attention_mask=mask).logits
    encoder = PrefixEncoder.for_model(base.config, P)
    patch = apply_prefix_tuning(base, encoder)
    assert base.config._attn_implementation == ATTENTION_NAME
    assert any(p is encoder.embedding.weight for p in base.parameters())
    patched = base(input_ids=ids, attention_mask=mask).logits
    assert (patched - before).abs().max() > 1e-3
    patch.remove()
    assert base.config._attn_implementation == "sdpa"
    assert not hasattr(base, "fastpeft_prefix_encoder")
    assert not any(hasattr(m, "_fastpeft_prefix") for m in base.modules())
    torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_zero_prefix_position_offset_zero_is_not_the_base_model():
    # A zero prefix still takes softmax mass (its scores are 0), so the output changes; with
    # position_offset=0 positions stay as in the base model.
    base = tiny()
    encoder = PrefixEncoder.for_model(base.config, P, init="zero")
    ids = torch.randint(0, 96, (1, 6))
    before = base(input_ids=ids).logits
    with apply_prefix_tuning(base, encoder, position_offset=0):
        assert (base(input_ids=ids).logits - before).abs().max() > 0


def test_errors():
    base = tiny()
    with pytest.raises(ValueError, match=r"\(layers, kv heads, head dim\) = \(2, 4, 16\) but the model needs \(2, 2, 16\)"):
        apply_prefix_tuning(base, PrefixEncoder(2, 4, 16, P))
    encoder = PrefixEncoder.for_model(base.config, P)
    with apply_prefix_tuning(base, encoder):
        with pytest.raises(ValueError, match="already has a fastpeft prefix"):
            apply_prefix_tuning(base, encoder)
        with pytest.raises(ValueError, match="prefix_index has 2 entries for a batch of 3"):
            base(input_ids=torch.randint(0, 96, (3, 4)), prefix_index=torch.tensor([0, 0]))
        for m in base.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.1
        base.train()  # attention dropout: concat + SDPA fallback (peft parity in test_prompt_learning_models)
        ids = torch.randint(0, 96, (1, 4))
        assert not torch.equal(base(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_dropout_fallback_shared_prefix_matches_an_explicit_index(padding):
    # The attention-dropout fallback expands a shared prefix over the batch (no gather, whose
    # backward is an accumulating index_put); it must equal gathering set 0 for every example,
    # outputs and gradients, with the same dropout masks.
    attention = tiny().model.layers[0].self_attn
    B, S, H, Hkv, D = 3, 7, 4, 2, 16
    torch.manual_seed(1)
    leaves = [torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D),
              torch.randn(1, Hkv, P, D), torch.randn(1, Hkv, P, D)]  # fmt: skip
    mask = None if padding == "none" else batch(B, S, padding)[1].bool()[:, None, None, :].expand(B, 1, S, S)
    results = []
    for index in (None, torch.zeros(B, dtype=torch.long)):
        q, k, v, pk, pv = (t.clone().requires_grad_() for t in leaves)
        torch.manual_seed(7)
        out, _ = integration._concatenated_attention(attention, q, k, v, pk, pv, index, mask, mask is None, 0.3, None)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in (q, k, v, pk, pv)])
    for got, want in zip(*results):
        assert torch.equal(got, want)
