"""Cloze-style classification with masked LMs: PET / LM-BFF (and the pieces WARP shares).

* ``Template``: ``"{text} It was {mask}."`` -> token ids and the mask position.
* ``Verbalizer``: label -> one-token label words (several words: mean of their scores).
* ``cloze_label_scores`` / ``ClozeClassifier``: label scores at the mask position from the hidden
  state there and the label words' output rows only (no ``[B, S, V]`` logits); ``cloze_loss``,
  ``cloze_predict``.
* ``select_demonstrations`` / ``format_demonstrations``: LM-BFF demonstrations, by similarity of
  mean-pooled frozen-encoder embeddings or at random with a seed.
* ``reference``: the plain full-vocabulary implementation the tests and benchmarks compare with.

See docs/prompting.md. WARP (``fastpeft.WarpConfig``) is in docs/warp.md.
"""

from fastpeft.prompting import reference
from fastpeft.prompting.demonstrations import format_demonstrations, mean_pooled_embeddings, select_demonstrations
from fastpeft.prompting.mlm import MaskedLMParts, split_masked_lm
from fastpeft.prompting.scoring import ClozeClassifier, cloze_label_scores, cloze_loss, cloze_predict, label_word_scores
from fastpeft.prompting.template import Template
from fastpeft.prompting.verbalizer import Verbalizer

__all__ = [
    "ClozeClassifier", "MaskedLMParts", "Template", "Verbalizer", "cloze_label_scores", "cloze_loss", "cloze_predict",
    "format_demonstrations", "label_word_scores", "mean_pooled_embeddings", "reference", "select_demonstrations",
    "split_masked_lm",
]  # fmt: skip
