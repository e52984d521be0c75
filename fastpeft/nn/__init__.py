"""Drop-in nn.Modules built on fastpeft ops."""

from fastpeft.nn.adaptable_adapter import AdaptableAdapter
from fastpeft.nn.adapter import BottleneckAdapter, BottleneckAdapterStack
from fastpeft.nn.ia3 import IA3Linear
from fastpeft.nn.invertible_adapter import InvertibleAdapter
from fastpeft.nn.lora import LoRALinear, LoRAProjectionGroup
from fastpeft.nn.lora_embedding import LoRAEmbedding
from fastpeft.nn.multi_lora import MultiLoRALinear
from fastpeft.nn.prefix import PrefixEncoder
from fastpeft.nn.probing import ProbingHead
from fastpeft.nn.soft_prompt import PromptEncoder, SoftPrompt
from fastpeft.nn.sparse_delta import SparseDeltaLinear
from fastpeft.nn.trainable_tokens import TrainableTokensEmbedding

__all__ = [
    "BottleneckAdapter", "BottleneckAdapterStack", "IA3Linear", "LoRAEmbedding", "LoRALinear", "LoRAProjectionGroup",
    "MultiLoRALinear", "PrefixEncoder", "PromptEncoder", "SoftPrompt", "SparseDeltaLinear", "TrainableTokensEmbedding",
    "InvertibleAdapter", "ProbingHead", "AdaptableAdapter",
]  # fmt: skip
