"""LM-BFF demonstrations: one labelled example per class appended to each input.

Selection is deterministic. ``strategy="similarity"`` (LM-BFF's SBERT-style selection): every text
is embedded by a frozen encoder (the attention-masked mean of its last hidden state), and for each
query and each class the pool example of that class with the highest cosine similarity is taken
(LM-BFF samples among the top half; picking the top one keeps runs reproducible without a seed).
``strategy="random"``: one example per class drawn uniformly with ``random.Random`` seeded by
``(seed, query index)``. A pool example whose text equals the query is never its demonstration
(training on the pool itself must not show an example its own answer).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from torch import nn

from fastpeft.prompting.mlm import split_masked_lm
from fastpeft.prompting.template import Template
from fastpeft.prompting.verbalizer import Verbalizer

STRATEGIES = ("similarity", "random")


@torch.no_grad()
def mean_pooled_embeddings(encoder: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """[N, H]: each text's last hidden state averaged over its tokens (SBERT's mean pooling), with
    ``encoder`` (a bare encoder or a masked LM, whose body is used) in eval mode and no grad."""
    body = split_masked_lm(encoder).body
    device = next(body.parameters()).device
    training = body.training
    body.eval()
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt").to(device)
            hidden = body(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return torch.cat(out) if out else torch.zeros(0, 0)
    finally:
        body.train(training)


def select_demonstrations(queries: Sequence[str], pool_texts: Sequence[str], pool_labels: Sequence[int], num_labels: int,
                          strategy: str = "similarity", encoder: Optional[nn.Module] = None, tokenizer=None,
                          seed: int = 0, query_embeddings: Optional[torch.Tensor] = None,
                          pool_embeddings: Optional[torch.Tensor] = None) -> list:  # fmt: skip
    """For each query, the pool indices of its demonstrations: one per label ``0..num_labels-1``,
    in label order (see the module docstring). ``similarity`` needs ``encoder`` and ``tokenizer``,
    or precomputed ``query_embeddings`` / ``pool_embeddings``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(pool_texts) != len(pool_labels):
        raise ValueError(f"pool_texts and pool_labels differ in length: {len(pool_texts)} vs {len(pool_labels)}")
    bad = [y for y in pool_labels if not 0 <= int(y) < num_labels]
    if bad:
        raise ValueError(f"pool_labels must be label indices in [0, {num_labels}), got {sorted(set(bad))}")
    by_label = [[j for j, y in enumerate(pool_labels) if int(y) == c] for c in range(num_labels)]
    if strategy == "similarity":
        if query_embeddings is None or pool_embeddings is None:
            if encoder is None or tokenizer is None:
                raise ValueError("strategy='similarity' needs encoder and tokenizer (or precomputed embeddings)")
            query_embeddings = mean_pooled_embeddings(encoder, tokenizer, queries)
            pool_embeddings = mean_pooled_embeddings(encoder, tokenizer, pool_texts)
        sim = nn.functional.normalize(query_embeddings.float(), dim=-1) @ nn.functional.normalize(
            pool_embeddings.float(), dim=-1).T  # fmt: skip
    chosen = []
    for i, query in enumerate(queries):
        rng = random.Random(seed * 1_000_003 + i)
        picks = []
        for c, members in enumerate(by_label):
            candidates = [j for j in members if pool_texts[j] != query]
            if not candidates:
                raise ValueError(f"no demonstration of label {c} for query {i} ({query!r}): the pool has no other "
                                 "example of that label")  # fmt: skip
            if strategy == "random":
                picks.append(rng.choice(candidates))
            else:
                scores = sim[i, candidates]
                picks.append(candidates[int(scores.argmax())])
        chosen.append(picks)
    return chosen


def format_demonstrations(template: Template, verbalizer: Verbalizer, pool_texts: Sequence[str],
                          selected: Sequence[Sequence[int]], pool_labels: Sequence[int]) -> list:  # fmt: skip
    """The demonstration strings for ``Template.encode``: each selected pool example through the
    template with its label's first label word in the mask's place."""
    return [[template.fill(pool_texts[j], verbalizer.words[int(pool_labels[j])][0]) for j in picks] for picks in selected]
