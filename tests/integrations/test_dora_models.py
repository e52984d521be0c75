"""DoRA (LoraConfig(use_dora=True)) on fastpeft's fused op against peft on tiny Llama / Qwen2 / BERT,
dense and NF4: outputs, gradients, checkpoints both ways, patch, merge, saved bytes, bad configs."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.nn import LoRALinear  # noqa: E402
from fastpeft.ops import dora_linear_reference, new_seed  # noqa: E402
from tests.integrations.helpers import (assert_checkpoints_both_ways, assert_parity, batch, lora_config, recorded_ops, tiny_model,  # noqa: E402
                                        tiny_model_4bit, twins, unlabelled)  # fmt: skip
from tests.utils import OneLayer, assert_close, saved_tensor_bytes  # noqa: E402

DORA_OP = "fastpeft.dora_linear.default"


def dora_config(arch, **kwargs):
    return lora_config(arch, use_dora=True, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_dense_parity_with_peft(arch):
    peft_model, fast = twins(tiny_model(arch), dora_config(arch))
    layers = [m for m in fast.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.use_dora for m in layers)
    assert fast.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    grads = assert_parity(peft_model, fast, batch(arch))
    assert any("lora_magnitude_vector" in n for n in grads)
    ops = recorded_ops(fast, unlabelled(batch(arch)))
    assert ops.count(DORA_OP) == len(layers)
    assert "aten::linalg_vector_norm" not in " ".join(ops)  # the norm comes from the cached ||W||^2


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_nf4_parity_with_peft(arch, tmp_path):
    peft_model, fast = twins(tiny_model_4bit(arch, tmp_path), dora_config(arch))
    assert all(m.is_4bit and m.use_dora for m in fast.modules() if isinstance(m, LoRALinear))
    assert_parity(peft_model, fast, batch(arch), scale=20)


def test_magnitude_init_is_peft_norm(tmp_path):
    peft_model = peft.get_peft_model(tiny_model_4bit("llama", tmp_path), dora_config("llama"))
    fast = fastpeft.get_peft_model(tiny_model_4bit("llama", tmp_path), dora_config("llama"))
    want = {n.replace(".default.weight", ""): p for n, p in peft_model.named_parameters() if "magnitude" in n}
    got = {n: p for n, p in fast.named_parameters() if "magnitude" in n}
    assert set(got) == set(want) and got
    for name in want:  # fastpeft dequantizes in float32, bitsandbytes in the stored dtype: same values
        assert_close(got[name], want[name], scale=4, msg=name)


def test_dropout_in_training_is_peft_math_with_the_seeded_mask():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20), r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1.1)
    x = torch.randn(5, 24)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    seed = new_seed()
    base = layer.base_layer
    want = dora_linear_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight,
                                 layer.lora_magnitude_vector, layer.scaling, 0.3, seed)  # fmt: skip
    assert_close(out, want, scale=10)
    layer.eval()  # eval: no dropout, the base product is reused
    want = dora_linear_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight,
                                 layer.lora_magnitude_vector, layer.scaling)  # fmt: skip
    assert_close(layer(x), want, scale=10)


def test_checkpoints_both_ways(tmp_path):
    base = tiny_model("llama")
    peft_model, fast = twins(base, dora_config("llama"))
    assert_checkpoints_both_ways(base, peft_model, fast, unlabelled(batch("llama")), tmp_path)


def test_merge_and_unload_equals_peft_merge():
    peft_model, fast = twins(tiny_model("llama"), dora_config("llama"))
    inputs = unlabelled(batch("llama"))
    fast.eval()
    expected = fast(**inputs).logits
    merged = fast.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert_close(merged(**inputs).logits, expected, scale=100)
    peft_merged = peft_model.merge_and_unload()
    for (n, p), (_, q) in zip(merged.named_parameters(), peft_merged.named_parameters()):
        assert_close(p, q, scale=10, msg=n)


def test_merge_unmerge_restores_the_base():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=2, lora_alpha=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(0.9)
    layer.eval()
    x = torch.randn(3, 16)
    before, weight = layer(x), layer.base_layer.weight.detach().clone()
    layer.merge()
    assert_close(layer(x), before, scale=10)
    layer.unmerge()
    assert_close(layer.base_layer.weight, weight, scale=10)
    assert_close(layer(x), before, scale=10)


def test_saves_less_than_peft_dora():
    torch.manual_seed(0)
    base = nn.Linear(256, 192)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], use_dora=True)
    peft_model = peft.get_peft_model(OneLayer(copy.deepcopy(base)), config)
    fast = fastpeft.get_peft_model(OneLayer(copy.deepcopy(base)), config, group_projections=False)
    x = torch.randn(128, 256, requires_grad=True)
    params = [p for m in (peft_model, fast) for p in m.parameters()]
    peft_bytes, _, _ = saved_tensor_bytes(lambda: peft_model(x), exclude=params + [x])
    fast_bytes, shapes, _ = saved_tensor_bytes(lambda: fast(x), exclude=params + [x])
    assert (192, 256) not in shapes  # nothing of the weight's size
    assert fast_bytes < peft_bytes, (fast_bytes, peft_bytes)


def test_patch_runs_peft_dora_layers_fused():
    peft_model, _ = twins(tiny_model("llama"), dora_config("llama"))
    reference = copy.deepcopy(peft_model)
    report = fastpeft.patch(peft_model, warn=False)
    assert report.patched and not report.skipped
    inputs = batch("llama")
    assert recorded_ops(peft_model, unlabelled(inputs)).count(DORA_OP) == len(report.patched)
    assert_parity(reference, peft_model, inputs)
    peft_model.eval()
    reference.eval()
    assert_close(peft_model(**unlabelled(inputs)).logits, reference(**unlabelled(inputs)).logits, scale=10)


def test_unsupported_dora_uses_raise_before_touching_the_model():
    model = tiny_model("llama")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(NotImplementedError, match="DoRA covers linear layers, not embeddings"):
        fastpeft.get_peft_model(model, dora_config("llama", target_modules=["q_proj", "embed_tokens"]))
    assert [n for n, _ in model.named_modules()] == names
    plain = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    with pytest.raises(NotImplementedError, match="use_dora=True in add_adapter"):
        plain.add_adapter("other", dora_config("llama"))
    fast = fastpeft.get_peft_model(model, dora_config("llama"))
    with pytest.raises(NotImplementedError, match="use_dora=True in add_adapter"):
        fast.add_adapter("other", dora_config("llama"))
    with pytest.raises(NotImplementedError, match="DoRA layers"):
        fast.add_adapter("other", lora_config("llama"))
    with pytest.raises(ValueError, match="DoRA layers .* run alone"):
        fastpeft.nn.LoRAProjectionGroup([m for m in fast.modules() if isinstance(m, LoRALinear)][:2])


def test_grouping_leaves_dora_layers_alone():
    fast = fastpeft.get_peft_model(tiny_model("llama"), dora_config("llama"), group_projections=True)
    assert not any(m.__dict__.get("_shared_input_group") for m in fast.modules() if isinstance(m, LoRALinear))
