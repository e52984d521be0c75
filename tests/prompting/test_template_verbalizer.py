"""Templates and verbalizers: encoding, the mask position, aggregation, and the errors users can cause."""

import pytest
import torch

from fastpeft.prompting import Template, Verbalizer
from tests.prompting.helpers import tiny_tokenizer
from tests.utils import assert_close


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def test_encode_finds_the_mask_and_fills_the_template(tok):
    enc = Template("{text} it was {mask} .").encode(tok, ["the movie was fun", "boring"])
    ids = enc["input_ids"]
    assert enc["mask_positions"].tolist() == [7, 4]
    for row, pos in zip(ids, enc["mask_positions"]):
        assert int(row[pos]) == tok.mask_token_id
        assert int((row == tok.mask_token_id).sum()) == 1
    assert tok.decode(ids[1][enc["attention_mask"][1].bool()]) == "[CLS] boring it was [MASK]. [SEP]"


@pytest.mark.parametrize("template, message", [
    ("{text} it was .", "exactly one {mask}"),
    ("{text} it was [MASK] .", "write the mask as {mask}"),
    ("{text} {mask} {mask}", "exactly one {mask}"),
    ("it was {mask} .", "exactly one {text}"),
    ("{text} {text} {mask}", "exactly one {text}"),
    ("{text} {mask} {label}", "only use {text} and {mask}"),
    ("{text {mask}", "not a valid format string"),
])  # fmt: skip
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match="template") as info:
        Template(template)
    assert message in str(info.value)


def test_text_holding_a_mask_token_is_refused(tok):
    with pytest.raises(ValueError, match=r"2 mask tokens"):
        Template("{text} it was {mask} .").encode(tok, ["the [MASK] movie"])


def test_truncation_that_drops_the_mask_is_refused(tok):
    with pytest.raises(ValueError, match="max_length"):
        Template("{text} it was {mask} .").encode(tok, ["the movie was fun and the plot"], max_length=5)


def test_verbalizer_ids_and_order(tok):
    v = Verbalizer({"pos": ["great", "good"], "neg": "bad"}, tok)
    assert v.labels == ["pos", "neg"] and v.words == [["great", "good"], ["bad"]]
    assert v.token_ids.tolist() == tok.convert_tokens_to_ids(["great", "good", "bad"])
    assert v.word_label.tolist() == [0, 0, 1] and len(v) == 2 and v.num_words == 3
    assert Verbalizer(["great", "bad"], tok).labels == [0, 1]


def test_mean_and_logsumexp_aggregation(tok):
    words = torch.randn(5, 3)
    mean = Verbalizer({"pos": ["great", "good"], "neg": "bad"}, tok).label_scores(words)
    lse = Verbalizer({"pos": ["great", "good"], "neg": "bad"}, tok, aggregate="logsumexp").label_scores(words)
    assert_close(mean, torch.stack([words[:, :2].mean(1), words[:, 2]], 1))
    assert_close(lse, torch.stack([torch.logsumexp(words[:, :2], 1), words[:, 2]], 1))


@pytest.mark.parametrize("label_words, message", [
    ({}, "label_words is empty"),
    ([], "label_words is empty"),
    ([("pos", "great"), ("pos", "good")], "duplicate labels: 'pos'"),
    ({"pos": []}, "label 'pos' has no label words"),
    ({"pos": "great", "neg": "great"}, "label word 'great' is used twice"),
    ({"pos": "unbelievable"}, "label word 'unbelievable' is not one token"),
    ({"pos": "zebra"}, "label word 'zebra' is not in the vocabulary"),
    ("great", "label_words must be"),
])  # fmt: skip
def test_bad_verbalizers_are_refused(tok, label_words, message):
    with pytest.raises(ValueError) as info:
        Verbalizer(label_words, tok)
    assert message in str(info.value)


def test_not_one_token_names_the_tokenization(tok):
    with pytest.raises(ValueError, match=r"\['un', '##believable'\]"):
        Verbalizer({"pos": "unbelievable"}, tok)


def test_bad_aggregate_and_score_width(tok):
    with pytest.raises(ValueError, match="aggregate"):
        Verbalizer(["great"], tok, aggregate="max")
    with pytest.raises(ValueError, match="columns"):
        Verbalizer(["great", "bad"], tok).label_scores(torch.zeros(2, 3))
