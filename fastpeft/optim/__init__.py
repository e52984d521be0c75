"""Sparse fine-tuning: mask selection (FishMask, BitFit, random) and SparseMaskedAdamW."""

from fastpeft.optim.bitfit import bitfit_mask
from fastpeft.optim.fisher import fisher_mask, fisher_scores
from fastpeft.optim.masked_grads import MaskedGradsReport, remove_masked_weight_grads, use_masked_weight_grads
from fastpeft.optim.masks import (
    Mask,
    index_dtype,
    load_mask,
    mask_density,
    save_mask,
    validate_indices,
    validate_mask,
)
from fastpeft.optim.random_mask import random_mask
from fastpeft.optim.sparse_adamw import SparseMaskedAdamW, state_bytes_formula
from fastpeft.optim.topk import topk_indices

__all__ = [
    "Mask",
    "MaskedGradsReport",
    "SparseMaskedAdamW",
    "bitfit_mask",
    "fisher_mask",
    "fisher_scores",
    "index_dtype",
    "load_mask",
    "mask_density",
    "random_mask",
    "remove_masked_weight_grads",
    "save_mask",
    "state_bytes_formula",
    "topk_indices",
    "use_masked_weight_grads",
    "validate_indices",
    "validate_mask",
]
