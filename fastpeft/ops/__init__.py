"""Typed wrappers of ``torch.ops.fastpeft.*`` with fake kernels, autograd and plain-PyTorch references."""

from fastpeft.ops.adapter import bottleneck_adapter, bottleneck_adapter_reference
from fastpeft.ops.dora import dora_linear, dora_linear_reference
from fastpeft.ops.dropout import dropout_reference, new_seed
from fastpeft.ops.ia3 import ia3_linear, ia3_linear_reference, ia3_scale, ia3_scale_reference
from fastpeft.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fastpeft.ops.masked_linear import masked_weight_linear, masked_weight_linear_reference
from fastpeft.ops.lora import lora_linear, lora_linear_grouped, lora_linear_multi, lora_linear_reference
from fastpeft.ops.prefix_attention import prefix_attention, prefix_attention_reference
from fastpeft.ops.multi_lora import MultiLoRAPlan, multi_lora_linear, multi_lora_linear_reference, plan_multi_lora
from fastpeft.ops.quant4bit import dequantize_4bit, dequantize_4bit_reference
from fastpeft.ops.int8 import dequantize_int8
from fastpeft.ops.sparse_delta import sparse_delta_linear, sparse_delta_linear_reference
from fastpeft.ops.sparse_optim import sparse_adamw_step, sparse_adamw_step_reference

__all__ = [
    "bottleneck_adapter",
    "bottleneck_adapter_reference",
    "dequantize_4bit",
    "dequantize_4bit_reference",
    "dequantize_int8",
    "dora_linear",
    "dora_linear_reference",
    "dropout_reference",
    "ia3_linear",
    "ia3_linear_reference",
    "ia3_scale",
    "ia3_scale_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_grouped",
    "lora_linear_multi",
    "lora_linear_reference",
    "masked_weight_linear",
    "masked_weight_linear_reference",
    "MultiLoRAPlan",
    "multi_lora_linear",
    "multi_lora_linear_reference",
    "new_seed",
    "sparse_adamw_step",
    "sparse_adamw_step_reference",
    "sparse_delta_linear",
    "sparse_delta_linear_reference",
    "prefix_attention",
    "prefix_attention_reference",
    "plan_multi_lora",
]
