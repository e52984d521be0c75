"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup

__all__ = ["LoRALinear", "LoRAProjectionGroup"]
