"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup
from fastpeft.nn.multi_lora import MultiLoRALinear

__all__ = ["LoRALinear", "LoRAProjectionGroup", "MultiLoRALinear"]
