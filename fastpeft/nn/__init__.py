"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup
from fastpeft.nn.prefix import PrefixEncoder
from fastpeft.nn.soft_prompt import PromptEncoder, SoftPrompt

__all__ = ["LoRALinear", "LoRAProjectionGroup", "PrefixEncoder", "PromptEncoder", "SoftPrompt"]
