"""dtype semantics of the wrapped base in every family (fastpeft.nn.base): outside autocast a dense
base refuses x of another dtype, as nn.Linear (and peft) do; bitsandbytes bases compute in their
compute dtype and return x's dtype, as bitsandbytes does; under autocast everything runs in the
autocast dtype."""

import pytest
import torch
from torch import nn

from fastpeft.nn import IA3Linear, LoRALinear, LoRAProjectionGroup, MultiLoRALinear, SparseDeltaLinear

bnb = pytest.importorskip("bitsandbytes")


def layers_on(make_base):
    """One layer of every family around a fresh base from ``make_base()``, and how to call it."""
    multi = MultiLoRALinear(make_base())
    multi.add_adapter("a", r=2, lora_alpha=2)
    idx = torch.tensor([0, 1, 2])
    return {
        "lora": (LoRALinear(make_base(), r=2, lora_alpha=2), lambda m, x: m(x)),
        "group": (LoRAProjectionGroup([LoRALinear(make_base(), r=2, lora_alpha=2)]), lambda m, x: m(x)[0]),
        "ia3": (IA3Linear(make_base(), is_feedforward=False), lambda m, x: m(x)),
        "ia3_ff": (IA3Linear(make_base(), is_feedforward=True), lambda m, x: m(x)),
        "sparse_delta": (SparseDeltaLinear(make_base(), idx), lambda m, x: m(x)),
        "multi_lora": (multi, lambda m, x: m(x, torch.tensor([0, -1]))),
    }


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float64])
def test_dense_base_refuses_another_input_dtype_like_nn_linear(x_dtype):
    x = torch.randn(2, 16, dtype=x_dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(16, 8)(x)  # the base layer's own rule
    for name, (layer, call) in layers_on(lambda: nn.Linear(16, 8)).items():
        with pytest.raises(RuntimeError, match=rf"expected x of dtype torch.float32 .* got {x_dtype}"):
            call(layer, x)


def test_dense_base_in_its_own_dtype_and_under_autocast():
    for name, (layer, call) in layers_on(lambda: nn.Linear(16, 8).to(torch.bfloat16)).items():
        assert call(layer, torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16, name
    for name, (layer, call) in layers_on(lambda: nn.Linear(16, 8)).items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(layer, torch.randn(2, 16))
        assert y.dtype == torch.bfloat16, name  # as nn.Linear under autocast


def linear4bit(in_f=16, out_f=8):
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def linear8bit():
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    layer.load_state_dict(nn.Linear(16, 8).state_dict())
    return layer.to("cpu")


@pytest.mark.parametrize("make_base", [linear4bit, linear8bit], ids=["4bit", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_quantized_bases_return_x_dtype_like_bitsandbytes(make_base, x_dtype):
    x = torch.randn(2, 16, dtype=x_dtype)
    assert make_base()(x).dtype == x_dtype  # bitsandbytes' own rule
    for name, (layer, call) in layers_on(make_base).items():
        assert call(layer, x).dtype == x_dtype, name


def test_wrapping_keeps_the_standard_4bit_layout_and_a_repacked_weight_is_refused():
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on an eval-mode forward
    without grad (lossy: bf16 absmax); wrapped bases opt out, and a weight already repacked is
    refused with a clear error instead of being read wrongly."""
    from fastpeft.quant import Quant4bitWeight

    base = linear4bit()
    base.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such CPUs
    LoRALinear(base, r=2, lora_alpha=2)
    assert base.support_avx512bf16_for_cpu is False
    repacked = linear4bit(128, 64)  # the repacked layout needs whole 32-row blocks
    repacked.weight.data, repacked.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        repacked.weight.data, repacked.weight.quant_state
    )
    with pytest.raises(ValueError, match="repacked this weight for its AVX512-BF16 CPU kernel"):
        Quant4bitWeight.from_bnb(repacked.weight)
    with pytest.raises(TypeError, match="repacked for its AVX512-BF16 CPU kernel"):
        IA3Linear(repacked, is_feedforward=False)
