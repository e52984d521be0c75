"""BitFit (Ben Zaken et al. 2022): train only bias terms.

``which="all"`` trains every bias (attention, MLP and LayerNorm biases, as BitFit's "all").
``which="query_mlp2"`` trains only the query projection's and the second MLP layer's biases, the
paper's smallest variant (~0.04% of BERT-base with the classifier). Both return a mask whose
entries are ``None`` (every entry of a bias is trained), so SparseMaskedAdamW updates them as
dense vectors with no index overhead.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from fastpeft.optim.masks import Mask, matching_names

# Names of the query projection and the second MLP layer across common architectures: BERT /
# RoBERTa (attention.self.query, layer.N.output.dense but not attention.output.dense),
# DistilBERT (q_lin, ffn.lin2), Llama / Mistral / Qwen (q_proj, mlp.down_proj), OPT / BART /
# Whisper (q_proj, fc2), GPT-2 (attn.c_attn holds q, k and v together: not selectable alone,
# mlp.c_proj), GPT-NeoX (dense_4h_to_h), T5 (DenseReluDense.wo).
_QUERY = re.compile(r"(^|\.)(query|q_proj|q_lin|q)\.bias$")
_MLP2 = re.compile(
    r"((^|\.)(?<!attention\.)output\.dense|(^|\.)fc2|(^|\.)lin2|(^|\.)down_proj|mlp\.c_proj|dense_4h_to_h|"
    r"DenseReluDense\.wo)\.bias$"
)


def is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def bitfit_mask(model: nn.Module, which: str = "all", dense_modules: Sequence[str] = ()) -> Mask:
    """Mask training the model's bias terms (``which="all"``) or only the query and second-MLP
    biases (``which="query_mlp2"``), plus every parameter of ``dense_modules`` (e.g. the
    classifier head, which BitFit trains too). Raises ValueError when nothing matches."""
    if which not in ("all", "query_mlp2"):
        raise ValueError(f"which must be 'all' or 'query_mlp2', got {which!r}")
    names = [n for n, _ in model.named_parameters()]
    if which == "all":
        chosen = [n for n in names if is_bias(n)]
    else:
        chosen = [n for n in names if _QUERY.search(n) or _MLP2.search(n)]
    if not chosen:
        raise ValueError(
            f"bitfit_mask(which={which!r}) matched no parameter of {type(model).__name__}; "
            "the model may have no biases (Llama has none), or name them differently"
        )
    mask: Mask = {n: None for n in chosen}
    for n in matching_names(model, dense_modules):
        mask[n] = None
    return mask
