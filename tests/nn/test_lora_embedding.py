"""fastpeft.nn.LoRAEmbedding against peft's lora.Embedding (same weights: outputs, gradients)."""

import copy

import pytest
import torch
from torch import nn

from fastpeft.nn import LoRAEmbedding
from tests.utils import assert_close, saved_tensor_bytes

peft = pytest.importorskip("peft")


def _peft_layer(base, r=4, alpha=8, **config):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["emb"], **config)
    return peft.tuners.lora.layer.Embedding(base, "default", config=cfg, r=r, lora_alpha=alpha)


def _pair(padding_idx=None, dtype=torch.float32, r=4, use_rslora=False, scale_grad_by_freq=False):
    torch.manual_seed(0)
    base = nn.Embedding(50, 24, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq).to(dtype)
    ref = _peft_layer(copy.deepcopy(base), r=r, use_rslora=use_rslora)
    fast = LoRAEmbedding(copy.deepcopy(base), r=r, lora_alpha=8, use_rslora=use_rslora)
    with torch.no_grad():
        ref.lora_embedding_A["default"].normal_()
        ref.lora_embedding_B["default"].normal_()
        fast.lora_embedding_A.copy_(ref.lora_embedding_A["default"])
        fast.lora_embedding_B.copy_(ref.lora_embedding_B["default"])
    return ref, fast


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_matches_peft(padding_idx, use_rslora, scale_grad_by_freq):
    ref, fast = _pair(padding_idx, use_rslora=use_rslora, scale_grad_by_freq=scale_grad_by_freq)
    x = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 3, 3]])
    out_r, out_f = ref(x), fast(x)
    assert out_f.shape == (2, 5, 24) and out_f.dtype == out_r.dtype
    assert_close(out_f, out_r)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    assert_close(fast.lora_embedding_A.grad, ref.lora_embedding_A["default"].grad)
    assert_close(fast.lora_embedding_B.grad, ref.lora_embedding_B["default"].grad)
    if padding_idx is not None:
        assert torch.all(fast.lora_embedding_A.grad[:, padding_idx] == 0)
    assert fast.base_layer.weight.grad is None


def test_bf16_base_matches_peft():
    ref, fast = _pair(dtype=torch.bfloat16)
    x = torch.randint(0, 50, (3, 7))
    out_r, out_f = ref(x), fast(x)
    assert out_f.dtype == torch.bfloat16
    # Both add in float32 and round once to bfloat16; the float32 sums differ in the last bits (addmm
    # vs multiply-then-add), so a result may sit one bfloat16 rounding step from peft's.
    ulp = torch.finfo(torch.bfloat16).eps * out_r.float().abs().clamp_min(1.0)
    assert torch.all((out_f.float() - out_r.float()).abs() <= ulp)


def test_init_matches_peft_stream_and_names():
    base = nn.Embedding(50, 24)
    torch.manual_seed(5)
    ref = _peft_layer(copy.deepcopy(base))
    torch.manual_seed(5)
    fast = LoRAEmbedding(copy.deepcopy(base), r=4, lora_alpha=8)
    assert fast.lora_embedding_A.shape == (4, 50) and fast.lora_embedding_B.shape == (24, 4)
    assert torch.equal(fast.lora_embedding_A, ref.lora_embedding_A["default"])
    assert torch.equal(fast.lora_embedding_B, ref.lora_embedding_B["default"])
    assert sorted(n for n, p in fast.named_parameters() if p.requires_grad) == ["lora_embedding_A", "lora_embedding_B"]


def test_saved_for_backward_is_ids_and_codes_only():
    _, fast = _pair()
    x = torch.randint(0, 50, (4, 16))
    nbytes, shapes, _ = saved_tensor_bytes(lambda: fast(x), exclude=[fast.lora_embedding_A, fast.lora_embedding_B,
                                                                      fast.base_layer.weight])  # fmt: skip
    # exactly the token ids (int64) and the [tokens, r] codes: never a [num_embeddings, dim] delta
    assert nbytes == x.numel() * 8 + x.numel() * 4 * 4, shapes


def test_merge_unmerge_and_delta():
    ref, fast = _pair()
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = fast(x)
        assert_close(fast.get_delta_weight(), ref.get_delta_weight("default"))
        w0 = fast.base_layer.weight.clone()
        fast.merge()
        assert_close(fast(x), expected)
        fast.unmerge()
        assert_close(fast.base_layer.weight, w0)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="nn.Embedding"):
        LoRAEmbedding(nn.Linear(3, 4), r=2, lora_alpha=2)
    with pytest.raises(TypeError, match="max_norm"):
        LoRAEmbedding(nn.Embedding(5, 4, max_norm=1.0), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="r must be"):
        LoRAEmbedding(nn.Embedding(5, 4), r=0, lora_alpha=2)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRAEmbedding(nn.Embedding(5, 4), r=2, lora_alpha=2, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="token ids"):
        LoRAEmbedding(nn.Embedding(5, 4), r=2, lora_alpha=2)(torch.zeros(2, 3))


def test_embed_scale_multiplies_the_adapter_as_in_peft():
    ref, fast = _pair()
    ref.base_layer.embed_scale = 3.0
    fast.base_layer.embed_scale = 3.0
    x = torch.randint(0, 50, (2, 6))
    assert_close(fast(x), ref(x))
