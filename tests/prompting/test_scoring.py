"""Cloze scoring against the plain full-vocabulary reference: outputs and gradients, on a tiny
BertForMaskedLM (MLM head: transform + decoder rows + bias) and a bare BertModel (tied word
embeddings), frozen or adapted with fastpeft LoRA."""

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft.prompting import ClozeClassifier, Template, Verbalizer, cloze_label_scores, cloze_loss, cloze_predict
from fastpeft.prompting.reference import cloze_label_scores_reference, full_vocab_logits_reference
from tests.prompting.helpers import tiny_body, tiny_mlm, tiny_tokenizer
from tests.utils import assert_close

TEXTS = ["the movie was fun", "boring plot", "the actors loved this story !", "a film"]
LABELS = torch.tensor([0, 1, 0, 2])


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def _setup(tok, kind, aggregate="mean"):
    model = tiny_mlm(tok) if kind == "mlm" else tiny_body(tok)
    v = Verbalizer({"pos": ["great", "good"], "neg": ["bad", "terrible", "awful"], "meh": "okay"}, tok, aggregate)
    enc = Template("{text} it was {mask} .").encode(tok, TEXTS)
    return model, v, enc


def _grads(model, v, enc, fn):
    model.zero_grad(set_to_none=True)
    scores = fn(model, v, **enc)
    cloze_loss(scores, LABELS).backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mlm", "body"])
@pytest.mark.parametrize("aggregate", ["mean", "logsumexp"])
def test_scores_and_gradients_match_the_full_vocab_reference(tok, kind, aggregate):
    model, v, enc = _setup(tok, kind, aggregate)
    scores, grads = _grads(model, v, enc, cloze_label_scores)
    scores_ref, grads_ref = _grads(model, v, enc, cloze_label_scores_reference)
    assert scores.shape == (len(TEXTS), 3)
    assert_close(scores, scores_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for name in grads:
        assert_close(grads[name], grads_ref[name], scale=10.0, msg=name)


def test_mlm_head_path_uses_transform_and_decoder_bias(tok):
    model, v, enc = _setup(tok, "mlm")
    hidden = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    h = model.cls.predictions.transform(hidden[torch.arange(4), enc["mask_positions"]])
    rows = model.cls.predictions.decoder.weight[v.token_ids]
    words = h @ rows.T + model.cls.predictions.decoder.bias[v.token_ids]
    assert_close(cloze_label_scores(model, v, **enc), v.label_scores(words))
    assert model.cls.predictions.decoder.bias.abs().max() > 0.1  # the bias is not trivially zero


def test_bare_body_scores_are_dot_products_with_word_embeddings(tok):
    model, v, enc = _setup(tok, "body")
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    words = hidden[torch.arange(4), enc["mask_positions"]] @ model.get_input_embeddings().weight[v.token_ids].T
    assert_close(cloze_label_scores(model, v, **enc), v.label_scores(words))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_vocabulary_sized_logits_are_made(tok):
    _, v, enc = _setup(tok, "mlm")
    model = tiny_mlm(tok, vocab_size=5000)  # V = 5000 > B * S, as real vocabularies are
    B, S = enc["input_ids"].shape
    full = B * S * 5000

    def largest(fn):
        with _LargestOutput() as mode:
            cloze_loss(fn(model, v, **enc), LABELS).backward()
        return mode.largest

    # The reference makes [B, S, V] logits (and their gradient); fastpeft's largest tensor is smaller
    # (here: the [V, H] gradient of the tied embeddings; H = 32 < B * S).
    assert largest(cloze_label_scores_reference) >= full
    assert largest(cloze_label_scores) < full


@pytest.mark.parametrize("kind", ["mlm", "body"])
def test_lora_adapted_encoder_matches_the_reference(tok, kind):
    model, v, enc = _setup(tok, kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    fast = fastpeft.get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, p in fast.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    scores, grads = _grads(fast, v, enc, cloze_label_scores)
    scores_ref, grads_ref = _grads(fast, v, enc, cloze_label_scores_reference)
    assert_close(scores, scores_ref)
    assert grads and all("lora_" in n for n in grads)  # only the adapters train
    for name in grads:
        assert_close(grads[name], grads_ref[name], scale=10.0, msg=name)
    fast.unload()
    plain = cloze_label_scores(model, v, **enc)
    assert not torch.allclose(plain, scores, atol=1e-6)  # the adapters changed the scores


def test_cloze_classifier_loss_and_predict(tok):
    model, v, _ = _setup(tok, "mlm")
    clf = ClozeClassifier(model, tok, "{text} it was {mask} .", v)
    enc = clf.encode(TEXTS)
    scores = clf(**enc)
    assert_close(clf.loss(scores, LABELS), nn.functional.cross_entropy(scores, LABELS))
    assert torch.equal(clf.predict(scores), scores.argmax(-1)) and torch.equal(cloze_predict(scores), scores.argmax(-1))
    assert v.label_of_index(clf.predict(scores))[0] in v.labels
    with pytest.raises(ValueError, match="mask_positions"):
        clf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def test_full_vocab_reference_is_the_models_own_logits(tok):
    model, v, enc = _setup(tok, "mlm")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(full_vocab_logits_reference(model, **inputs), model(**inputs).logits)


def test_unsupported_model_is_refused(tok):
    with pytest.raises(ValueError, match="neither a BERT-style masked LM"):
        ClozeClassifier(nn.Linear(2, 2), tok, "{text} {mask}", Verbalizer(["great"], tok))


def test_wrong_mask_positions_shape_is_refused(tok):
    model, v, enc = _setup(tok, "body")
    enc["mask_positions"] = enc["mask_positions"][:2]
    with pytest.raises(ValueError, match="mask_positions must have shape"):
        cloze_label_scores(model, v, **enc)
