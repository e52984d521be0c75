"""Shared test setup: CUDA-marked tests skip when no GPU is visible; CPU tests always run."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# bitsandbytes 0.50 repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel on the first
# eval-mode forward without grad, rounding the absmax to bfloat16 (errors ~1e-2 against its exact
# path). Peers in parity tests must compute exactly, and whether a CI CPU has AVX512-BF16 must not
# change results: tests create every Linear4bit with the repack off. (fastpeft's own layers switch
# it off on their bases; tests/nn/test_base_dtypes.py checks that and the error for a repacked
# weight.)
try:
    import bitsandbytes.nn.modules as _bnb_modules

    _bnb_modules.has_avx512bf16 = lambda: False
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
