"""PET / LM-BFF verbalizers: each label is said by one or more label words, each one token.

A label's score is the **mean** of its words' scores (``aggregate="mean"``, PET's choice for
several verbalizations) or their ``logsumexp`` (``aggregate="logsumexp"``: a soft maximum, the
log of the summed word probabilities up to the shared normaliser). With one word per label both
are that word's score.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

Words = Union[str, Sequence[str]]
AGGREGATES = ("mean", "logsumexp")


def _pairs(label_words) -> list:
    if isinstance(label_words, Mapping):
        return list(label_words.items())
    if isinstance(label_words, (str, bytes)) or not isinstance(label_words, Sequence):
        raise ValueError("label_words must be a dict label -> word(s), a list of (label, word(s)) pairs or a list of "
                         f"word(s) per label index, got {type(label_words).__name__}")  # fmt: skip
    items = list(label_words)
    if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
        return items
    return list(enumerate(items))


class Verbalizer:
    """Label -> label words, checked against ``tokenizer``: every word must be exactly one token.

    ``label_words``: ``{"positive": "great", "negative": ["bad", "awful"]}``, a list of
    ``(label, words)`` pairs, or a list of words per label index. Label order (the order of the
    score columns and of ``predict``'s indices) is the order given. For byte-level BPE tokenizers
    (RoBERTa, GPT-2) write the word as it appears after a space, e.g. ``" great"``.

    Raises ValueError for an empty verbalizer, a label without words, duplicate labels, a word used
    twice, and a word that is not one token (naming the word and its tokenization)."""

    def __init__(self, label_words, tokenizer, aggregate: str = "mean"):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        pairs = _pairs(label_words)
        if not pairs:
            raise ValueError("label_words is empty: a verbalizer needs at least one label")
        labels = [label for label, _ in pairs]
        duplicates = sorted({repr(x) for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ValueError(f"label_words has duplicate labels: {', '.join(duplicates)}")
        self.labels, self.words, self.aggregate = labels, [], aggregate
        token_ids, word_label, seen = [], [], {}
        for index, (label, words) in enumerate(pairs):
            words = [words] if isinstance(words, str) else list(words)
            if not words:
                raise ValueError(f"label {label!r} has no label words")
            for word in words:
                if not isinstance(word, str) or not word:
                    raise ValueError(f"label {label!r}: label words must be non-empty strings, got {word!r}")
                if word in seen:
                    raise ValueError(f"label word {word!r} is used twice (labels {seen[word]!r} and {label!r})")
                seen[word] = label
                token_ids.append(self._one_token(tokenizer, word))
                word_label.append(index)
            self.words.append(words)
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)  # [W]
        self.word_label = torch.tensor(word_label, dtype=torch.long)  # [W]

    @staticmethod
    def _one_token(tokenizer, word: str) -> int:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        if len(ids) != 1:
            raise ValueError(f"label word {word!r} is not one token: {type(tokenizer).__name__} splits it into "
                             f"{pieces} (ids {ids}); pick a word that is a single token")  # fmt: skip
        if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"label word {word!r} is not in the vocabulary (it tokenizes to {pieces})")
        return ids[0]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Verbalizer({dict(zip(self.labels, self.words))!r}, aggregate={self.aggregate!r})"

    @property
    def num_words(self) -> int:
        """How many label words there are (W), over all labels."""
        return int(self.token_ids.numel())

    def label_scores(self, word_scores: torch.Tensor) -> torch.Tensor:
        """Per-word scores [B, W] (in ``token_ids`` order) -> per-label scores [B, L]."""
        if word_scores.shape[-1] != self.num_words:
            raise ValueError(f"word_scores must have {self.num_words} columns (one per label word), got "
                             f"{tuple(word_scores.shape)}")  # fmt: skip
        L = len(self.labels)
        if self.num_words == L:  # one word per label, in label order
            return word_scores
        groups = self.word_label.to(word_scores.device)
        member = groups[None, :] == torch.arange(L, device=groups.device)[:, None]  # [L, W]
        if self.aggregate == "mean":
            weights = member.to(word_scores.dtype) / member.sum(1, keepdim=True).to(word_scores.dtype)
            return word_scores @ weights.T
        masked = word_scores[:, None, :].masked_fill(~member, float("-inf"))  # [B, L, W]
        return torch.logsumexp(masked, dim=-1)

    def label_of_index(self, indices: torch.Tensor) -> list:
        """Predicted indices -> the labels themselves."""
        return [self.labels[i] for i in indices.tolist()]
