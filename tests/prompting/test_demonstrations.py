"""LM-BFF demonstrations: deterministic selection (similarity or seeded random) and the encoded layout."""

import pytest
import torch

from fastpeft.prompting import (Template, Verbalizer, format_demonstrations, mean_pooled_embeddings,
                                select_demonstrations)  # fmt: skip
from tests.prompting.helpers import tiny_body, tiny_tokenizer

POOL = ["the movie was fun", "the film was great", "boring plot", "the story was bad", "a film"]
POOL_LABELS = [0, 0, 1, 1, 0]


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def test_similarity_picks_the_most_similar_example_of_each_class():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[0.9, 0.1], [0.1, 0.9], [1.0, 0.2], [0.2, 1.0], [-1.0, 0.0]])
    chosen = select_demonstrations(["q0", "q1"], ["a", "b", "c", "d", "e"], [0, 0, 1, 1, 0], 2,
                                   query_embeddings=q, pool_embeddings=pool)  # fmt: skip
    assert chosen == [[0, 2], [1, 3]]


def test_similarity_with_an_encoder_is_deterministic_and_never_picks_the_query_itself(tok):
    body = tiny_body(tok)
    a = select_demonstrations(POOL, POOL, POOL_LABELS, 2, encoder=body, tokenizer=tok)
    b = select_demonstrations(POOL, POOL, POOL_LABELS, 2, encoder=body, tokenizer=tok)
    assert a == b
    for i, picks in enumerate(a):
        assert [POOL_LABELS[j] for j in picks] == [0, 1] and i not in picks


def test_random_is_seeded():
    many = ["x"] * 3
    pool = [f"t{i}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    a = select_demonstrations(many, pool, labels, 2, strategy="random", seed=1)
    assert a == select_demonstrations(many, pool, labels, 2, strategy="random", seed=1)
    assert a != select_demonstrations(many, pool, labels, 2, strategy="random", seed=2)
    assert all(labels[p] == c for picks in a for c, p in enumerate(picks))


def test_mean_pooling_ignores_padding(tok):
    body = tiny_body(tok)
    together = mean_pooled_embeddings(body, tok, ["boring plot", "the actors loved this story !"])
    alone = mean_pooled_embeddings(body, tok, ["boring plot"])
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)


def test_demonstrations_are_appended_as_the_second_segment(tok):
    template, v = Template("{text} it was {mask} ."), Verbalizer({"pos": "great", "neg": "bad"}, tok)
    picks = select_demonstrations(["a film"], POOL, POOL_LABELS, 2, strategy="random", seed=0)
    demos = format_demonstrations(template, v, POOL, picks, POOL_LABELS)
    enc = template.encode(tok, ["a film"], demonstrations=demos)
    text = tok.decode(enc["input_ids"][0])
    first, second = POOL[picks[0][0]], POOL[picks[0][1]]
    assert text == f"[CLS] a film it was [MASK]. [SEP] {first} it was great. [SEP] {second} it was bad. [SEP]"
    assert int(enc["input_ids"][0, enc["mask_positions"][0]]) == tok.mask_token_id


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="nearest"), "strategy must be one of"),
    (dict(strategy="similarity"), "needs encoder and tokenizer"),
    (dict(pool_labels=[0, 0, 1, 1, 2]), "label indices in"),
    (dict(pool_labels=[0, 1]), "differ in length"),
])  # fmt: skip
def test_bad_selection_arguments(kwargs, message):
    args = dict(queries=["q"], pool_texts=POOL, pool_labels=POOL_LABELS, num_labels=2, strategy="random") | kwargs
    with pytest.raises(ValueError, match=message):
        select_demonstrations(**args)


def test_a_class_without_other_examples_is_refused():
    with pytest.raises(ValueError, match="no demonstration of label 1"):
        select_demonstrations(["boring plot"], ["boring plot", "a film"], [1, 0], 2, strategy="random")


def test_demonstrations_must_match_the_texts(tok):
    with pytest.raises(ValueError, match="one list per text"):
        Template("{text} {mask}").encode(tok, ["a", "b"], demonstrations=[["c"]])
