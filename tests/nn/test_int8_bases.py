"""(IA)^3, sparse deltas and multi-LoRA on bitsandbytes int8 (LLM.int8(), Linear8bitLt) bases.

The exact reference is each op's plain-PyTorch reference on the dequantized weight
W = CB * SCB[:, None] / 127 (``Int8Weight``): the layers feed the int8 weight to the same op as a
dense or 4-bit one, so outputs and gradients must match it at fp32 tolerance. (bitsandbytes' own
forward also quantizes the activations on a GPU; see tests/nn/test_lora_8bit.py.)
"""

import pytest
import torch
from torch import nn

from fastpeft.nn import IA3Linear, MultiLoRALinear, SparseDeltaLinear
from fastpeft.nn.sparse_delta import apply_sparse_deltas
from fastpeft.ops import ia3_linear_reference, multi_lora_linear_reference, sparse_delta_linear_reference
from fastpeft.ops.sparse_delta import merged_weight_reference
from fastpeft.quant import Int8Weight
from tests.utils import assert_close, leaf, saved_tensor_bytes, weight_tensors

bnb = pytest.importorskip("bitsandbytes")


def linear8bit(in_f, out_f, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def grads(y, leaves, g):
    return torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("num_tasks", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ia3_on_int8_matches_reference(is_feedforward, num_tasks, dtype):
    base = linear8bit(48, 40)
    layer = IA3Linear(base, is_feedforward=is_feedforward, num_tasks=num_tasks)
    assert layer.base_kind == "int8" and "int8" in repr(layer)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.3 * torch.randn(layer.ia3_l.shape))
    x = leaf(torch.randn(3, 5, 48, dtype=dtype))
    ids = torch.tensor([2, 0, 2]) if num_tasks else None
    y = layer(x, ids)
    assert y.dtype == dtype  # a quantized base returns x's dtype, as bitsandbytes does
    w = Int8Weight.from_bnb(base)
    v = layer.ia3_l if num_tasks else layer.ia3_l.reshape(1, -1)
    y_ref = ia3_linear_reference(x, w, base.bias.to(dtype), v, ids, is_feedforward)
    g = torch.randn_like(y)
    scale = 10 if dtype == torch.float32 else 1
    assert_close(y, y_ref, dtype=dtype, scale=scale)
    for a, b in zip(grads(y, (x, layer.ia3_l), g), grads(y_ref, (x, layer.ia3_l), g)):
        assert_close(a.float(), b.float(), dtype=dtype, scale=scale * 10)


def test_ia3_on_int8_saves_no_weight_and_refuses_merge():
    base = linear8bit(64, 32)
    layer = IA3Linear(base, is_feedforward=False)
    x = torch.randn(4, 64, requires_grad=True)
    nbytes, shapes, _ = saved_tensor_bytes(lambda: layer(x), exclude=[layer.ia3_l, *weight_tensors(Int8Weight.from_bnb(base))])
    assert nbytes == 4 * 32 * 4, shapes  # y alone: no dequantized weight, no second [M, out]
    with pytest.raises(NotImplementedError, match="int8 weight cannot hold"):
        layer.merge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_delta_on_int8_matches_reference(dtype):
    base = linear8bit(40, 24)
    idx = torch.randperm(40 * 24)[:70].sort().values.to(torch.int32)
    layer = SparseDeltaLinear(base, idx, torch.randn(70) * 0.05)
    assert layer.base_kind == "int8"
    x = leaf(torch.randn(2, 7, 40, dtype=dtype))
    y = layer(x)
    assert y.dtype == dtype
    w = Int8Weight.from_bnb(base)
    y_ref = sparse_delta_linear_reference(x, w, base.bias.to(dtype), layer.indices, layer.values)
    g = torch.randn_like(y)
    scale = 10 if dtype == torch.float32 else 1
    assert_close(y, y_ref, dtype=dtype, scale=scale)
    for a, b in zip(grads(y, (x, layer.values), g), grads(y_ref, (x, layer.values), g)):
        assert_close(a.float(), b.float(), dtype=dtype, scale=scale * 10)
    # W + D, rounded once after the float32 sum, by the forward's own kernels
    assert torch.equal(layer.merged_weight(), merged_weight_reference(w, layer.indices, layer.values.detach(), torch.float32))
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert_close(merged(x.detach().float()), layer(x.detach().float()), scale=10)


def test_apply_sparse_deltas_wraps_int8_layers():
    model = nn.Sequential(linear8bit(16, 8))
    layers = apply_sparse_deltas(model, {"0.weight": torch.tensor([0, 5, 100], dtype=torch.int32)})
    assert layers["0"].base_kind == "int8" and model[0] is layers["0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_lora_on_int8_matches_reference(dtype):
    base = linear8bit(32, 24)
    layer = MultiLoRALinear(base)
    for name, r in (("a", 2), ("b", 5)):
        layer.add_adapter(name, r=r, lora_alpha=2 * r)
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    assert layer.base_kind == "int8"
    x = leaf(torch.randn(4, 3, 32, dtype=dtype))
    index = torch.tensor([1, -1, 0, 1])
    y = layer(x, index)
    assert y.dtype == dtype
    params = [layer.lora_A["a"].weight, layer.lora_A["b"].weight, layer.lora_B["a"].weight, layer.lora_B["b"].weight]
    cast = [p.to(dtype) for p in params]
    y_ref = multi_lora_linear_reference(x, Int8Weight.from_bnb(base), base.bias.to(dtype), cast[:2], cast[2:],
                                        [layer.scaling["a"], layer.scaling["b"]], index)  # fmt: skip
    g = torch.randn_like(y)
    scale = 10 if dtype == torch.float32 else 1
    assert_close(y, y_ref, dtype=dtype, scale=scale)
    for a, b in zip(grads(y, [x, *params], g), grads(y_ref, [x, *params], g)):
        assert_close(a.float(), b.float(), dtype=dtype, scale=scale * 10)
