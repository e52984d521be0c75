"""peft's trainable_token_indices on fastpeft's TrainableTokensEmbedding: the layer against peft's
math, get_peft_model against peft (outputs, gradients, checkpoints both ways, merge), memory, and
the configurations it refuses."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.nn.trainable_tokens import TrainableTokensEmbedding  # noqa: E402
from tests.integrations.helpers import (assert_checkpoints_both_ways, assert_parity, batch, lora_config, tiny_model, twins,  # noqa: E402
                                        unlabelled)  # fmt: skip
from tests.utils import assert_close, saved_tensors  # noqa: E402

IDS = [3, 5, 7, 100]


def peft_math(layer, x):
    W = layer.base_layer.weight
    index = torch.tensor(layer.token_indices)
    return F.embedding(x, W.index_copy(0, index, layer.token_adapter.trainable_tokens_delta.to(W)),
                       padding_idx=layer.base_layer.padding_idx)  # fmt: skip


@pytest.mark.parametrize("padding_idx", [None, 5], ids=["no-padding", "padding-is-trainable"])
def test_layer_is_peft_math(padding_idx):
    torch.manual_seed(0)
    layer = TrainableTokensEmbedding(nn.Embedding(128, 16, padding_idx=padding_idx), IDS)
    with torch.no_grad():
        layer.token_adapter.trainable_tokens_delta.normal_()
    twin = copy.deepcopy(layer)
    x = torch.tensor([[3, 1, 5, 5, 100], [0, 7, 127, 3, 9]])
    g = torch.randn(2, 5, 16)
    out = layer(x)
    out.backward(g)
    want = peft_math(twin, x)
    want.backward(g)
    assert torch.equal(out, want)
    delta, delta_ref = layer.token_adapter.trainable_tokens_delta, twin.token_adapter.trainable_tokens_delta
    assert_close(delta.grad, delta_ref.grad)
    assert layer.base_layer.weight.grad is None


def test_no_weight_sized_tensor_is_made_or_saved():
    layer = TrainableTokensEmbedding(nn.Embedding(50000, 64), IDS)
    x = torch.randint(0, 50000, (4, 32))
    saved, _ = saved_tensors(lambda: layer(x))
    assert all(t.numel() < 50000 * 64 for t in saved), [tuple(t.shape) for t in saved]


def test_parity_with_peft_and_checkpoints_both_ways(tmp_path):
    base = tiny_model("llama")
    config = lora_config("llama", target_modules=["q_proj", "v_proj"], trainable_token_indices=IDS)
    peft_model, fast = twins(base, config)
    with torch.no_grad():  # trained-looking rows
        for model in (peft_model, fast):
            for n, p in model.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    inputs = batch("llama")
    inputs["input_ids"][0, :4] = torch.tensor(IDS)
    grads = assert_parity(peft_model, fast, inputs)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in grads
    plain = unlabelled(inputs)
    assert_checkpoints_both_ways(base, peft_model, fast, plain, tmp_path)
    merged = fast.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensEmbedding) for m in merged.modules())
    assert_close(merged(**plain).logits, peft_model(**plain).logits, scale=100)


def test_refused_configurations_leave_the_model_unchanged():
    model = tiny_model("llama")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"token_indices must be ints in \[0, 128\)"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=["q_proj"], trainable_token_indices=[3, 999]))
    with pytest.raises(ValueError, match="no module of the model matches 'nope'"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=["q_proj"],
                                                   trainable_token_indices={"nope": [1]}))  # fmt: skip
    with pytest.raises(NotImplementedError, match="LoRA target too"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=["q_proj", "embed_tokens"],
                                                   trainable_token_indices=[1]))  # fmt: skip
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(NotImplementedError, match="tied weights"):
        fastpeft.get_peft_model(tied, lora_config("llama", target_modules=["q_proj"], trainable_token_indices=[1]))
    assert [n for n, _ in model.named_modules()] == names
    with pytest.raises(ValueError, match="must not repeat"):
        TrainableTokensEmbedding(nn.Embedding(10, 4), [1, 1])
    with pytest.raises(TypeError, match="max_norm"):
        TrainableTokensEmbedding(nn.Embedding(10, 4, max_norm=1.0), [1])
    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama", target_modules=["q_proj"],
                                                                    trainable_token_indices=[1]))  # fmt: skip
    with pytest.raises(NotImplementedError, match="trainable tokens"):
        fast.add_adapter("other", lora_config("llama", target_modules=["q_proj"]))
