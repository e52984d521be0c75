"""PrefixEncoder: layouts, peft compatibility, initialisation, banks."""

import pytest
import torch
from transformers import LlamaConfig

from fastpeft.nn import PrefixEncoder
from fastpeft.ops import prefix_attention

peft = pytest.importorskip("peft")


def peft_prefix_encoder(layers, kv_heads, head_dim, P, projection, hidden=None):
    from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=kv_heads * head_dim,
                                     num_layers=layers, num_attention_heads=kv_heads, prefix_projection=projection,
                                     encoder_hidden_size=hidden or kv_heads * head_dim)  # fmt: skip
    return PeftPrefixEncoder(config)


def peft_layers(encoder, layers, kv_heads, head_dim, P):
    """peft's own reshaping of its encoder output into per-layer (k, v) (PeftModel.get_prompt)."""
    table = encoder(torch.arange(P).unsqueeze(0))  # [1, P, layers * 2 * kv_dim]
    table = table.view(1, P, layers * 2, kv_heads, head_dim).permute([2, 0, 3, 1, 4]).split(2)
    return [(kv[0], kv[1]) for kv in table]


@pytest.mark.parametrize("projection", [False, True])
def test_same_weights_same_prefixes_as_peft(projection):
    layers, kv_heads, head_dim, P = 3, 2, 8, 5
    theirs = peft_prefix_encoder(layers, kv_heads, head_dim, P, projection, hidden=12)
    ours = PrefixEncoder(layers, kv_heads, head_dim, P, prefix_projection=projection, encoder_hidden_size=12)
    ours.load_state_dict(theirs.state_dict())  # same names and shapes
    expected = peft_layers(theirs, layers, kv_heads, head_dim, P)
    everything = ours()
    for i in range(layers):
        for got_all, got_one, want in zip(everything[i], ours.layer(i), expected[i]):
            assert got_one.shape == (1, kv_heads, P, head_dim)
            torch.testing.assert_close(got_all, want)
            torch.testing.assert_close(got_one, want)


def test_direct_prefixes_are_views_of_the_table():
    enc = PrefixEncoder(2, 2, 4, 3, num_prefixes=2)
    k, v = enc.layer(1)
    assert k.untyped_storage().data_ptr() == enc.embedding.weight.untyped_storage().data_ptr()
    assert k.shape == v.shape == (2, 2, 3, 4)


def test_zero_init():
    for projection in (False, True):
        enc = PrefixEncoder(2, 2, 4, 3, prefix_projection=projection, init="zero")
        assert all(not t.any() for pair in enc() for t in pair)
        if projection:  # only the MLP's last layer starts at zero; its inner weights stay random
            assert enc.embedding.weight.any() and enc.transform[0].weight.any()


def test_for_model_reads_gqa_layout():
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, head_dim=16)
    enc = PrefixEncoder.for_model(config, 7, num_prefixes=4)
    assert (enc.num_layers, enc.num_kv_heads, enc.head_dim, enc.num_virtual_tokens) == (3, 2, 16, 7)
    assert enc.layer(2)[0].shape == (4, 2, 7, 16)


def test_bank_sets_train_independently():
    # Gradient through the op reaches only the rows of the sets the batch used.
    enc = PrefixEncoder(1, 2, 8, 4, num_prefixes=3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pk, pv = enc.layer(0)
    prefix_attention(q, k, v, pk, pv, torch.tensor([2, 0])).sum().backward()
    per_set = enc.embedding.weight.grad.view(3, 4, -1).abs().sum((1, 2))
    assert per_set[0] > 0 and per_set[2] > 0 and per_set[1] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="init must be"):
        PrefixEncoder(1, 1, 4, 2, init="normal")
    with pytest.raises(ValueError, match="num_virtual_tokens must be >= 1"):
        PrefixEncoder(1, 1, 4, 0)
    with pytest.raises(IndexError, match="layer index 2 out of range for 2 layers"):
        PrefixEncoder(2, 1, 4, 2).layer(2)
