"""BottleneckAdapter / BottleneckAdapterStack against the adapters library's bottleneck adapters.

The ``adapters`` package (AdapterHub) 1.3.0 requires transformers ~= 4.57.6, and this project pins
transformers 5.17.0, so it is not installed here: its direct parity test skips with that reason.
The other tests check the same math against a plain-PyTorch transcription of the library's
``Adapter`` module and of its SeqBn / DoubleSeqBn placement and Stack composition
(adapters/methods/modeling.py and bottleneck.py: pre_forward, forward, post_forward, compose_stack).
"""

import pytest
import torch
from torch import nn

from fastpeft.nn import BottleneckAdapter, BottleneckAdapterStack
from tests.utils import assert_close

# The two configs, as the adapters library defines them (configuration/adapter_config.py).
SEQ_BN = dict(original_ln_before=True, residual_before_ln=True, non_linearity="relu", mh_adapter=False, output_adapter=True)
DOUBLE_SEQ_BN = dict(original_ln_before=False, residual_before_ln=True, non_linearity="swish", mh_adapter=True,
                     output_adapter=True)  # fmt: skip


class LibAdapter(nn.Module):
    """The adapters library's ``Adapter`` (no gating, ln_after False, dropout 0): forward(x, residual)
    = adapter_up(act(adapter_down(LN?(x)))) * scaling + residual."""

    def __init__(self, d, r, non_linearity, ln_before=False, scaling=1.0):
        super().__init__()
        act = {"relu": nn.ReLU(), "swish": nn.SiLU(), "gelu": nn.GELU()}[non_linearity]
        layers = ([nn.LayerNorm(d)] if ln_before else []) + [nn.Linear(d, r), act]
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(r, d)
        self.scaling = scaling
        with torch.no_grad():  # trained-looking weights (the library's "bert" init has zero biases)
            for p in self.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
            if ln_before:
                layers[0].weight.add_(1.0)

    def forward(self, x, residual):
        return self.adapter_up(self.adapter_down(x)) * self.scaling + residual

    def linears(self):
        ln = self.adapter_down[0] if isinstance(self.adapter_down[0], nn.LayerNorm) else None
        return self.adapter_down[-2], self.adapter_up, ln


def lib_bottleneck_layer(adapters, config, hidden_states, input_tensor, layer_norm):
    """bottleneck_layer_forward with a Stack of adapters (a single adapter is a stack of one)."""
    h = hidden_states
    for adapter in adapters:  # compose_stack: pre_block (pre_forward) then compose_single
        residual = h if config["residual_before_ln"] else None
        if config["original_ln_before"]:
            h = layer_norm(h + input_tensor)
        if not config["residual_before_ln"]:
            residual = h
        h = adapter(h, residual)
    return layer_norm(h + input_tensor)  # post_forward: original_ln_after


def ours_like(lib: LibAdapter, activation, num_adapters=1, index=0) -> BottleneckAdapter:
    down, up, ln = lib.linears()
    ours = BottleneckAdapter(down.in_features, down.out_features, activation, ln_before=ln is not None,
                             scaling=lib.scaling, num_adapters=num_adapters)  # fmt: skip
    ours.load_adapter(index, down, up, ln)
    return ours


def ours_bottleneck_layer(ours, config, hidden_states, input_tensor, layer_norm):
    if len(ours) > 1 and not config["original_ln_before"]:
        h = BottleneckAdapterStack(ours)(hidden_states)  # one fused call for the whole stack
    else:
        h = hidden_states
        for adapter in ours:
            if config["original_ln_before"]:  # SeqBn: adapter input is LN(h + input), residual is h
                h = adapter(layer_norm(h + input_tensor), residual=h)
            else:
                h = adapter(h)
    return layer_norm(h + input_tensor)


def flat_params(lib: LibAdapter):
    down, up, ln = lib.linears()
    out = [down.weight, down.bias, up.weight, up.bias]
    return out + ([ln.weight, ln.bias] if ln is not None else [])


def bank_params(ours: BottleneckAdapter):
    out = [ours.down_weight, ours.down_bias, ours.up_weight, ours.up_bias]
    return out + ([ours.ln_weight, ours.ln_bias] if ours.ln_before else [])


@pytest.mark.parametrize("config", [SEQ_BN, DOUBLE_SEQ_BN], ids=["SeqBn", "DoubleSeqBn"])
@pytest.mark.parametrize("stack", [1, 2])
@pytest.mark.parametrize("ln_before", [False, True])
def test_matches_adapters_library_math(config, stack, ln_before):
    d, r = 48, 3  # reduction_factor 16
    libs = [LibAdapter(d, r, config["non_linearity"], ln_before=ln_before, scaling=[1.0, 0.5][i]) for i in range(stack)]
    act = {"relu": "relu", "swish": "silu"}[config["non_linearity"]]
    ours = [ours_like(lib, act) for lib in libs]
    layer_norm = nn.LayerNorm(d)
    hidden, input_tensor = torch.randn(2, 9, d), torch.randn(2, 9, d)
    lib_params = [p for lib in libs for p in flat_params(lib)]
    our_params = [p for o in ours for p in bank_params(o)]
    a = [t.clone().requires_grad_(True) for t in (hidden, input_tensor)]
    b = [t.clone().requires_grad_(True) for t in (hidden, input_tensor)]
    y_lib = lib_bottleneck_layer(libs, config, *a, layer_norm)
    y_ours = ours_bottleneck_layer(ours, config, *b, layer_norm)
    assert_close(y_ours, y_lib, scale=10)
    g = torch.randn_like(y_lib)
    grads_lib = torch.autograd.grad(y_lib, a + lib_params, g)
    grads_ours = torch.autograd.grad(y_ours, b + our_params, g)
    for got, ref in zip(grads_ours, grads_lib):  # bank grads are [1, ...]: one adapter per bank
        assert_close(got.reshape(ref.shape), ref, scale=10)


def test_mixed_adapters_per_example_match_the_library_per_example():
    # A bank of three task adapters; each example must get exactly its own adapter's output.
    d, r, N = 32, 8, 3
    libs = [LibAdapter(d, r, "relu") for _ in range(N)]
    bank = BottleneckAdapter(d, r, "relu", num_adapters=N)
    for i, lib in enumerate(libs):
        bank.load_adapter(i, *lib.linears())
    x, h = torch.randn(5, 7, d), torch.randn(5, 7, d)
    ids = torch.tensor([2, 0, 1, 2, 1])
    y = bank(x, residual=h, adapter_ids=ids)
    for b in range(5):
        assert_close(y[b], libs[int(ids[b])](x[b], h[b]), scale=10)


def test_stack_layer_validates_its_members():
    a, b = BottleneckAdapter(16, 4, "relu"), BottleneckAdapter(16, 4, "gelu")
    with pytest.raises(ValueError, match="share activation"):
        BottleneckAdapterStack([a, b])
    with pytest.raises(ValueError, match="one entry"):
        BottleneckAdapterStack([a, a])(torch.randn(2, 16), adapter_ids=[None])
    with pytest.raises(ValueError, match="bottleneck_size must be an int >= 1"):
        BottleneckAdapter(16, 0)


def test_zero_up_init_is_identity_and_bf16_compute():
    layer = BottleneckAdapter(32, 8, "gelu", init_weights="zero_up")
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), x)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.bfloat16())


def test_parity_with_adapters_library():
    adapters = pytest.importorskip(
        "adapters",
        reason="adapters 1.3.0 requires transformers~=4.57.6 but this environment pins transformers 5.17.0; "
        "covered by the transcription tests above",
    )
    from adapters.methods.modeling import Adapter

    d = 64
    x, h = torch.randn(2, 5, d), torch.randn(2, 5, d)
    for config, act in ((adapters.SeqBnConfig(reduction_factor=16), "relu"), (adapters.DoubleSeqBnConfig(reduction_factor=16), "silu")):
        ref = Adapter("a", input_size=d, down_sample=d // 16, config=config)
        ours = BottleneckAdapter(d, d // 16, act)
        ours.load_adapter(0, ref.adapter_down[0], ref.adapter_up)
        out_ref = ref(x, residual_input=h)[0]
        assert_close(ours(x, residual=h), out_ref, scale=10)
