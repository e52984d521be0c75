"""fastpeft: fused kernels for parameter-efficient fine-tuning.

Operators live in ``torch.ops.fastpeft``; typed wrappers with autograd in ``fastpeft.ops``;
drop-in layers in ``fastpeft.nn``; bitsandbytes 4-bit weights as plain tensors in ``fastpeft.quant``;
sparse fine-tuning masks and SparseMaskedAdamW in ``fastpeft.optim``; saved-for-backward and peak
bytes of a training step in ``fastpeft.memory``.
"""

from fastpeft._extension import build_info
from fastpeft import ops, quant  # noqa: E402  (ops registers fake kernels and autograd)
from fastpeft import nn  # noqa: E402
from fastpeft import optim  # noqa: E402
from fastpeft import memory  # noqa: E402
from fastpeft.integrations import FastPeftModel, from_pretrained, get_peft_model, patch, unpatch  # noqa: E402
from fastpeft.integrations.adapter import BottleneckAdapterConfig  # noqa: E402
from fastpeft.integrations.adaptable_adapter import AdaptableAdapterConfig, prune as prune_adaptable_adapters  # noqa: E402
from fastpeft.integrations.sparse import BitFitConfig, FishMaskConfig  # noqa: E402
from fastpeft.integrations.invertible_adapter import InvertibleAdapterConfig  # noqa: E402
from fastpeft.integrations.probing import ProbingConfig  # noqa: E402
from fastpeft.integrations.warp import WarpConfig  # noqa: E402
from fastpeft import prompting  # noqa: E402

__all__ = [
    "build_info", "ops", "quant", "nn", "optim", "memory",
    "FastPeftModel", "from_pretrained", "get_peft_model", "patch", "unpatch",
    "BottleneckAdapterConfig", "AdaptableAdapterConfig", "prune_adaptable_adapters",
    "BitFitConfig", "FishMaskConfig",
    "InvertibleAdapterConfig", "ProbingConfig",
    "WarpConfig", "prompting",
]  # fmt: skip
__version__ = "0.1.0"
