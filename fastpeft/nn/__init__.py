"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup
from fastpeft.nn.multi_lora import MultiLoRALinear
from fastpeft.nn.prefix import PrefixEncoder
from fastpeft.nn.soft_prompt import PromptEncoder, SoftPrompt
from fastpeft.nn.sparse_delta import SparseDeltaLinear

__all__ = [
    "LoRALinear", "LoRAProjectionGroup", "MultiLoRALinear", "PrefixEncoder", "PromptEncoder", "SoftPrompt",
    "SparseDeltaLinear",
]  # fmt: skip
