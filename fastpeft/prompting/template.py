"""PET / LM-BFF templates: a text with a ``{text}`` slot and one ``{mask}`` placeholder.

``Template("{text} It was {mask}.")`` turns ``"A great film."`` into ``"A great film. It was [MASK]."``
with the tokenizer's own mask token (``[MASK]`` for BERT, ``<mask>`` for RoBERTa), so one template
works with every tokenizer. The mask is written ``{mask}``: a literal ``[MASK]`` in the template is
refused with a hint. LM-BFF demonstrations (one example per class) are appended as a second
segment: ``[CLS] x It was [MASK]. [SEP] demo_1 It was word_1. [SEP] demo_2 It was word_2. [SEP]``.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

import torch

TEXT, MASK = "text", "mask"


class Template:
    """A cloze pattern with exactly one ``{text}`` slot and exactly one ``{mask}`` placeholder.

    Other ``{...}`` fields are refused (write literal braces as ``{{`` / ``}}``). Raises ValueError
    naming ``template`` when the pattern is not valid."""

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise ValueError(f"template must be a str, got {type(template).__name__}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"template {template!r} is not a valid format string: {exc}") from exc
        hint = " (write the mask as {mask}, not [MASK] or <mask>)" if "[MASK]" in template or "<mask>" in template else ""
        if fields.count(MASK) != 1:
            raise ValueError(f"template must contain exactly one {{mask}} placeholder, got {fields.count(MASK)} in "
                             f"{template!r}{hint}")  # fmt: skip
        if fields.count(TEXT) != 1:
            raise ValueError(f"template must contain exactly one {{text}} slot, got {fields.count(TEXT)} in {template!r}")
        other = sorted(set(fields) - {TEXT, MASK})
        if other:
            raise ValueError(f"template may only use {{text}} and {{mask}}, got {other} in {template!r}")
        self.template = template

    def __repr__(self) -> str:
        return f"Template({self.template!r})"

    def fill(self, text: str, mask: str) -> str:
        """The template with ``text`` in its slot and ``mask`` (a mask token or a label word) in place."""
        return self.template.format(text=text, mask=mask)

    def encode(self, tokenizer, texts: Sequence[str], demonstrations: Optional[Sequence[Sequence[str]]] = None,
               max_length: Optional[int] = None, return_tensors: str = "pt") -> dict:  # fmt: skip
        """Tokenize ``texts`` through the template: ``input_ids``, ``attention_mask`` (and
        ``token_type_ids`` when the tokenizer makes them) [B, S], and ``mask_positions`` [B], the
        index of each example's mask token.

        ``demonstrations``: per text, the already filled demonstration strings (see
        ``fastpeft.prompting.format_demonstrations``), joined with the tokenizer's separator as the
        second segment. ``max_length`` truncates the *second* segment first (LM-BFF keeps the query);
        a mask truncated away raises ValueError."""
        if tokenizer.mask_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; cloze templates need one")
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got a single str")
        first = [self.fill(t, tokenizer.mask_token) for t in texts]
        kwargs = dict(padding=True, return_tensors=return_tensors)
        if max_length is not None:
            kwargs.update(truncation="only_second" if demonstrations is not None else True, max_length=max_length)
        if demonstrations is not None:
            if len(demonstrations) != len(texts):
                raise ValueError(f"demonstrations must hold one list per text: {len(demonstrations)} for "
                                 f"{len(texts)} texts")  # fmt: skip
            sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
            enc = tokenizer(first, [sep.join(d) for d in demonstrations], **kwargs)
        else:
            enc = tokenizer(first, **kwargs)
        is_mask = enc["input_ids"] == tokenizer.mask_token_id
        counts = is_mask.sum(1)
        if len(texts) and not bool((counts == 1).all()):
            bad = int(torch.nonzero(counts != 1)[0])
            raise ValueError(f"text {bad} ({texts[bad]!r}) gives {int(counts[bad])} mask tokens after templating and "
                             "truncation; need exactly 1 (a text must not contain the mask token, and max_length must "
                             "keep it)")  # fmt: skip
        out = dict(enc)
        out["mask_positions"] = is_mask.int().argmax(1)
        return out
