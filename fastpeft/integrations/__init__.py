"""Integrations: injection into HF transformers models, peft checkpoints, patching peft models."""

from fastpeft.integrations.checkpoint import CheckpointError
from fastpeft.integrations.model import FastPeftModel, from_pretrained, get_peft_model
from fastpeft.integrations.patch import PatchReport, patch, unpatch

__all__ = ["CheckpointError", "FastPeftModel", "PatchReport", "from_pretrained", "get_peft_model", "patch", "unpatch"]
