"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.adapter import BottleneckAdapter, BottleneckAdapterStack
from fastpeft.nn.ia3 import IA3Linear
from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup

__all__ = ["BottleneckAdapter", "BottleneckAdapterStack", "IA3Linear", "LoRALinear", "LoRAProjectionGroup"]
