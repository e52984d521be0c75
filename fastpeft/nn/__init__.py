"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup
from fastpeft.nn.sparse_delta import SparseDeltaLinear

__all__ = ["LoRALinear", "LoRAProjectionGroup", "SparseDeltaLinear"]
