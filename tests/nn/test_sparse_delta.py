"""SparseDeltaLinear on dense and bitsandbytes 4-bit bases: parity with nn.Linear / bitsandbytes'
dequantization plus the delta, gradients at the indices, merge, training parity with a masked
optimizer, model patching and bad input."""

import copy

import pytest
import torch
from torch import nn

from fastpeft.nn import SparseDeltaLinear
from fastpeft.nn.sparse_delta import apply_sparse_deltas
from fastpeft.optim import SparseMaskedAdamW, random_mask
from tests.utils import assert_close, devices

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402


def indices_for(out_f, in_f, k, seed=0, dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=gen)[:k].sort().values.to(dtype)


def linear4bit(in_f, out_f, quant_type="nf4", compute_dtype=torch.float32, bias=True):
    """A bitsandbytes Linear4bit (double-quantized, blocksize 64) made from a seeded nn.Linear."""
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # Params4bit quantizes when it is moved to a device


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_base_equals_linear_with_merged_weight(device, dtype):
    base = nn.Linear(45, 30, device=device, dtype=dtype)
    idx = indices_for(30, 45, 120).to(device)
    layer = SparseDeltaLinear(copy.deepcopy(base), idx)
    with torch.no_grad():
        layer.values.normal_()
    assert not layer.base_layer.weight.requires_grad and layer.values.dtype == torch.float32
    x = torch.randn(2, 7, 45, device=device, dtype=dtype)
    ref = nn.Linear(45, 30, device=device, dtype=dtype)
    with torch.no_grad():
        w = base.weight.float().reshape(-1).index_add(0, idx.long(), layer.values.float())
        ref.weight.copy_(w.view(30, 45).to(dtype))
        ref.bias.copy_(base.bias)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, ref(x), scale=10)
    g = torch.randn_like(y)
    y.backward(g)
    ref(x).backward(g)
    assert_close(layer.values.grad, ref.weight.grad.float().view(-1)[idx.long()], dtype=dtype, scale=10)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_base_equals_bitsandbytes_dequantization_plus_delta(quant_type):
    layer4 = linear4bit(64, 48, quant_type)
    idx = indices_for(48, 64, 200)
    sd = SparseDeltaLinear(layer4, idx)
    with torch.no_grad():
        sd.values.normal_(std=0.1)
    x = torch.randn(5, 64)
    w = BF.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state).float()
    w = w.reshape(-1).index_add(0, idx.long(), sd.values.detach()).view(48, 64)
    expected = nn.functional.linear(x, w, layer4.bias)
    assert_close(sd(x), expected, scale=10)
    # Without a delta the layer is bitsandbytes' own layer.
    with torch.no_grad():
        sd.values.zero_()
    assert_close(sd(x), layer4(x), scale=10)


def test_4bit_gradient_and_merge():
    layer4 = linear4bit(32, 24)
    sd = SparseDeltaLinear(layer4, indices_for(24, 32, 50))
    with torch.no_grad():
        sd.values.normal_()
    x = torch.randn(6, 32)
    y = sd(x)
    y.sum().backward()
    assert sd.values.grad is not None and layer4.weight.grad is None
    merged = sd.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert_close(merged(x), y.detach(), scale=10)
    assert torch.equal(sd.delta_weight().view(-1)[sd.indices.long()], sd.values.detach())


def test_training_values_equals_masked_training_of_the_dense_weight():
    """A sparse delta trained with AdamW moves W + D exactly like SparseMaskedAdamW moves W's
    masked entries: the same gradients, the same optimizer math."""
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    idx = indices_for(12, 20, 30)
    dense = copy.deepcopy(base)
    layer = SparseDeltaLinear(copy.deepcopy(base), idx)
    opt_delta = SparseMaskedAdamW([layer.values], masks=[None], lr=1e-2, weight_decay=0.0)
    dense.bias.requires_grad_(False)
    opt_dense = SparseMaskedAdamW([dense.weight], masks=[idx], lr=1e-2, weight_decay=0.0)
    for step in range(30):
        gen = torch.Generator().manual_seed(step)
        x, target = torch.randn(8, 20, generator=gen), torch.randn(8, 12, generator=gen)
        for model, opt in ((layer, opt_delta), (dense, opt_dense)):
            opt.zero_grad()
            (model(x) - target).pow(2).mean().backward()
            opt.step()
    assert_close(layer.merged_weight(), dense.weight.detach(), scale=10)


def test_apply_sparse_deltas_wraps_the_masked_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = model(x)
    mask = random_mask(model, keep_ratio=0.1, include=lambda n, p: n == "0.weight")
    layers = apply_sparse_deltas(model, mask)
    assert list(layers) == ["0"] and isinstance(model[0], SparseDeltaLinear)
    assert torch.equal(model[0].indices, mask["0.weight"])
    assert_close(model(x), before)  # zero delta: same function


def test_bad_input():
    with pytest.raises(ValueError, match=r"indices holds indices in \[0, 12\] but the tensor has 12 elements"):
        SparseDeltaLinear(nn.Linear(3, 4), torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="indices must be sorted"):
        SparseDeltaLinear(nn.Linear(3, 4), torch.tensor([5, 2]))
    with pytest.raises(ValueError, match=r"values must have shape \(2,\)"):
        SparseDeltaLinear(nn.Linear(3, 4), torch.tensor([1, 2]), values=torch.zeros(3))
    with pytest.raises(TypeError, match="wraps torch.nn.Linear"):
        SparseDeltaLinear(nn.Conv1d(3, 4, 1), torch.tensor([1]))


def test_state_dict_roundtrip_and_bad_checkpoint_indices(tmp_path):
    layer = SparseDeltaLinear(nn.Linear(6, 5), indices_for(5, 6, 7))
    with torch.no_grad():
        layer.values.normal_()
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    other = SparseDeltaLinear(nn.Linear(6, 5), indices_for(5, 6, 7, seed=1))
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(other.indices, layer.indices) and torch.equal(other.values, layer.values)
    bad = layer.state_dict()
    bad["indices"] = bad["indices"].flip(0)
    with pytest.raises(ValueError, match="indices must be sorted"):
        other.load_state_dict(bad)
