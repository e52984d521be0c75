"""WARP: the layout, outputs and gradients against the plain per-example reference, the prompt
bank with per-example prompt_index, initialisation, training through get_peft_model +
create_optimizer, checkpoints, and the errors users can cause."""

import os

import pytest
import torch

import fastpeft
from fastpeft.integrations.checkpoint import CheckpointError
from fastpeft.integrations.warp import BIAS_KEY, CLASS_KEY, PROMPT_KEY
from fastpeft.nn.warp import warp_layout, warp_logits_reference
from fastpeft.prompting import split_masked_lm
from tests.prompting.helpers import tiny_body, tiny_mlm, tiny_tokenizer
from tests.utils import assert_close

TEXTS = ["the movie was fun", "boring plot", "the actors loved this story !", "a film"]
LABELS = torch.tensor([0, 1, 1, 0])


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def _model(tok, kind, **config):
    base = tiny_mlm(tok) if kind == "mlm" else tiny_body(tok)
    config = fastpeft.WarpConfig.from_tokenizer(tok, ["great", "bad"], **{"num_before": 2, "num_after": 3, **config})
    return base, fastpeft.get_peft_model(base, config)


def _reference(fast, enc, prompt_index=None):
    parts, c, w = split_masked_lm(fast), fast.peft_config["default"], fast.warp
    prompts = w.prompt.soft_prompt.prompts()
    return warp_logits_reference(parts.body, parts.transform, fast.get_input_embeddings(), prompts,
                                 w.verbalizer.class_embeddings, w.verbalizer.bias, enc["input_ids"],
                                 enc["attention_mask"], c.num_before, c.mask_token_id, prompt_index)  # fmt: skip


def test_layout(tok):
    enc = tok(["the movie", "fun"], padding=True, return_tensors="pt")
    out = warp_layout(enc["input_ids"], enc["attention_mask"], 2, 1, tok.mask_token_id)
    ids = tok.convert_tokens_to_ids
    P = 0  # prompt slots hold the pad id
    assert out["input_ids"].tolist() == [
        [ids("[CLS]"), P, P, ids("the"), ids("movie"), P, ids("[MASK]"), ids("[SEP]")],
        [ids("[CLS]"), P, P, ids("fun"), P, ids("[MASK]"), ids("[SEP]"), 0],
    ]
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert out["prompt_positions"].tolist() == [[1, 2, 5], [1, 2, 4]]
    assert out["mask_positions"].tolist() == [6, 5]


@pytest.mark.parametrize("kind", ["mlm", "body"])
def test_outputs_and_gradients_match_the_reference(tok, kind):
    _, fast = _model(tok, kind)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    params = [p for p in fast.parameters() if p.requires_grad]
    out = fast(**enc, labels=LABELS)
    grads = torch.autograd.grad(out.loss, params)
    ref = _reference(fast, enc)
    grads_ref = torch.autograd.grad(torch.nn.functional.cross_entropy(ref, LABELS), params)
    assert out.logits.shape == (4, 2)
    assert_close(out.logits, ref)
    for g, r in zip(grads, grads_ref):
        assert g.abs().sum() > 0
        assert_close(g, r, scale=10.0)


def test_prompt_bank_mixed_batch_equals_per_example_runs(tok):
    _, fast = _model(tok, "mlm", num_prompts=3, prompt_init="random")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    index = torch.tensor([2, 0, 1, 2])
    mixed = fast(**enc, prompt_index=index).logits
    for i in range(4):
        one = tok([TEXTS[i]], return_tensors="pt")
        assert_close(mixed[i : i + 1], fast(**one, prompt_index=index[i : i + 1]).logits, scale=10.0)
    assert_close(mixed, _reference(fast, enc, index))
    assert not torch.allclose(mixed, fast(**enc).logits)  # the prompts differ
    with pytest.raises(ValueError, match=r"prompt_index must be in \[0, 3\)"):
        fast(**enc, prompt_index=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="prompt_index must have shape"):
        fast(**enc, prompt_index=torch.tensor([0, 1]))


def test_initialisation_from_label_words_and_mask(tok):
    base, fast = _model(tok, "mlm")
    ids = tok.convert_tokens_to_ids(["great", "bad"])
    w = fast.warp
    assert torch.equal(w.verbalizer.class_embeddings, base.cls.predictions.decoder.weight[ids])
    assert torch.equal(w.verbalizer.bias, base.cls.predictions.decoder.bias[ids])
    mask_row = base.get_input_embeddings().weight[tok.mask_token_id]
    assert torch.equal(w.prompt.soft_prompt.embedding.weight, mask_row.expand(5, -1))
    _, body = _model(tok, "body", class_bias=False)
    assert torch.equal(body.warp.verbalizer.class_embeddings, body.get_input_embeddings().weight[ids])
    assert body.warp.verbalizer.bias is None


def test_encoder_frozen_and_training_reduces_the_loss(tok):
    base, fast = _model(tok, "mlm")
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert trainable == {"warp.prompt.soft_prompt.embedding.weight", "warp.verbalizer.class_embeddings",
                         "warp.verbalizer.bias"}  # fmt: skip
    before = {n: p.clone() for n, p in base.named_parameters()}
    opt = fast.create_optimizer(lr=5e-2)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    losses = []
    for _ in range(15):
        loss = fast(**enc, labels=LABELS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_checkpoint_round_trip(tok, tmp_path):
    _, fast = _model(tok, "mlm", num_prompts=2)
    with torch.no_grad():
        for p in fast.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    index = torch.tensor([0, 1, 1, 0])
    expected = fast(**enc, prompt_index=index).logits
    fast.save_pretrained(str(tmp_path / "warp"))
    assert sorted(os.listdir(tmp_path / "warp")) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = fastpeft.from_pretrained(tiny_mlm(tok), str(tmp_path / "warp"))
    assert loaded.peft_config["default"] == fast.peft_config["default"]
    assert set(loaded.adapter_state_dict()) == {PROMPT_KEY, CLASS_KEY, BIAS_KEY}
    assert torch.equal(loaded(**enc, prompt_index=index).logits, expected)


def test_checkpoint_that_does_not_fit_is_refused(tok, tmp_path):
    _, fast = _model(tok, "mlm")
    fast.save_pretrained(str(tmp_path / "warp"))
    other = tiny_mlm(tok)
    _, wider = _model(tok, "mlm", num_after=4)
    wider.save_pretrained(str(tmp_path / "wider"))
    target = fastpeft.get_peft_model(other, fast.peft_config["default"])
    with pytest.raises(CheckpointError, match="shape mismatches"):
        target.load_adapter(str(tmp_path / "wider"))
    (tmp_path / "warp" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        fastpeft.from_pretrained(tiny_mlm(tok), str(tmp_path / "warp"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_token_ids=[]), "non-empty list"),
    (dict(label_token_ids=[7, 7]), "duplicates"),
    (dict(label_token_ids=["great"]), "one token id"),
    (dict(num_before=0, num_after=0), "num_before \\+ num_after"),
    (dict(num_before=-1), "num_before must be an int >= 0"),
    (dict(num_prompts=0), "num_prompts must be an int >= 1"),
    (dict(prompt_init="text"), "prompt_init"),
    (dict(class_bias="yes"), "class_bias"),
])  # fmt: skip
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastpeft.WarpConfig(**{"label_token_ids": [7, 8], "mask_token_id": 4, **kwargs})


def test_bad_label_words_and_inputs(tok):
    with pytest.raises(ValueError, match="'unbelievable' is not one token"):
        fastpeft.WarpConfig.from_tokenizer(tok, ["great", "unbelievable"])
    with pytest.raises(ValueError, match="exactly one label word per class"):
        fastpeft.WarpConfig.from_tokenizer(tok, {"pos": ["great", "good"], "neg": "bad"})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        fastpeft.get_peft_model(tiny_mlm(tok), fastpeft.WarpConfig(label_token_ids=[7, 999], mask_token_id=4))
    _, fast = _model(tok, "mlm")
    tok.padding_side = "left"
    with pytest.raises(ValueError, match="right-padded"):
        fast(**tok(TEXTS, padding=True, return_tensors="pt"))
