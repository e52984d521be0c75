"""FishMask (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks").

The empirical Fisher information of a parameter entry is approximated by its squared gradient
summed over N samples (batches). The mask keeps the entries with the largest scores. Squared
gradients are accumulated in place into one float32 tensor per eligible parameter (no list of
per-sample gradients), and the top-k is an exact radix select (fastpeft.optim.topk), not a sort.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from fastpeft.optim.masks import Mask, check_keep_ratio, keep_count, matching_names
from fastpeft.optim.topk import topk_indices

Eligible = Callable[[str, nn.Parameter], bool]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a dict batch (HF transformers style), else ``model(*batch)``
    when it returns a scalar."""
    out = model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor) and out.numel() == 1:
        loss = out
    if loss is None:
        raise ValueError("the model output has no .loss; pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


def eligible_parameters(
    model: nn.Module, include: Optional[Eligible], dense_modules: Sequence[str]
) -> "tuple[list, list]":
    """(names scored for the mask, names kept dense) among the model's floating-point parameters."""
    dense = set(matching_names(model, dense_modules))
    scored = []
    for name, p in model.named_parameters():
        if name in dense or not p.is_floating_point():
            continue
        if include is None or include(name, p):
            scored.append(name)
    return scored, sorted(dense)


def fisher_scores(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss,
    num_samples: Optional[int] = None,
) -> dict:
    """Sum over batches of the squared gradient of each named parameter, float32, in place.

    The named parameters get ``requires_grad=True`` for the duration and their previous flags and
    ``.grad`` are restored afterwards. The model's train/eval mode is left as it is.
    """
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in zip(names, chosen)}
    seen = 0
    try:
        chosen_ids = {id(p) for p in chosen}
        for p in params.values():
            p.requires_grad_(id(p) in chosen_ids)
            p.grad = None
        for batch in batches:
            if num_samples is not None and seen >= num_samples:
                break
            loss = loss_fn(model, batch)
            loss.backward()
            for n, p in zip(names, chosen):
                if p.grad is not None:
                    g = p.grad.float()
                    scores[n].addcmul_(g, g)
                    p.grad = None
            seen += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
    if seen == 0:
        raise ValueError("batches yielded no sample; the Fisher score needs at least one")
    return scores


def fisher_mask(
    model: nn.Module,
    batches: Iterable[Any],
    keep_ratio: float,
    scope: str = "global",
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss,
    num_samples: Optional[int] = None,
    include: Optional[Eligible] = None,
    dense_modules: Sequence[str] = (),
) -> Mask:
    """The FishMask of ``model``: the ``keep_ratio`` fraction of eligible entries with the
    largest empirical Fisher information.

    ``batches`` yields what ``loss_fn(model, batch)`` turns into a scalar loss (by default a dict
    of model inputs with labels, giving ``model(**batch).loss``); at most ``num_samples`` of them
    are used. Each batch contributes its squared gradient, so a batch of one example gives the
    per-sample empirical Fisher of the paper.

    ``scope="global"`` keeps ``round(keep_ratio * N)`` entries over all eligible parameters
    together; ``"per_layer"`` keeps that fraction of every parameter tensor. Eligible parameters
    are the floating-point ones accepted by ``include(name, param)`` (all by default), minus
    those in ``dense_modules`` (module or parameter names, e.g. ``("classifier",)``), which are
    not scored and stay fully trainable (mask value ``None``), as FISH does with the head.

    Returns a mask (see fastpeft.optim.masks): sorted flat indices per parameter, None for dense.
    """
    check_keep_ratio(keep_ratio)
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    names, dense = eligible_parameters(model, include, dense_modules)
    if not names:
        raise ValueError("no parameter is eligible for the mask; check include= and dense_modules=")
    scores = fisher_scores(model, batches, names, loss_fn, num_samples)
    mask: Mask = {}
    if scope == "global":
        total = sum(scores[n].numel() for n in names)
        for n, idx in zip(names, topk_indices([scores[n] for n in names], keep_count(keep_ratio, total))):
            if idx.numel():
                mask[n] = idx
    else:
        for n in names:
            (mask[n],) = topk_indices([scores[n]], keep_count(keep_ratio, scores[n].numel()))
    for n in dense:
        mask[n] = None
    return mask
