"""IA3Linear against HF peft's IA3 layers (dense and bitsandbytes 4-bit bases): same vectors give the
same outputs and gradients; state dicts map; mixed-task banks; merge/unmerge; saved tensors."""

import pytest
import torch
from torch import nn

from fastpeft.nn import IA3Linear
from tests.utils import assert_close, saved_storages

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from peft import IA3Config, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


class TinyBlock(nn.Module):
    """Attention key/value projections and an FFN, the modules (IA)^3 targets."""

    # Multiples of 64 (bitsandbytes' blocksize): bitsandbytes 0.50's CPU kernel reads blocks that
    # straddle rows differently from its own quantizer (see tests/ops/test_quant4bit.py).
    def __init__(self, d=64, ff=128, make=nn.Linear):
        super().__init__()
        self.k = make(d, d)
        self.v = make(d, d)
        self.up = make(d, ff)
        self.down = make(ff, d)

    def forward(self, x):
        return self.k(x) + self.v(x) + self.down(torch.relu(self.up(x)))


def linear4bit(quant_type="nf4"):
    def make(i, o):
        dense = nn.Linear(i, o)
        q = bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=True)
        q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        return q.to("cpu")

    return make


def peft_block(make=nn.Linear, is_4bit=False, dtype=torch.float32):
    block = TinyBlock(make=make)
    if not is_4bit:
        block.to(dtype)
    if is_4bit:
        block.is_loaded_in_4bit = True  # makes peft dispatch to its ia3.Linear4bit layer
    config = IA3Config(target_modules=["k", "v", "down"], feedforward_modules=["down"])
    model = get_peft_model(block, config)
    with torch.no_grad():  # trained-looking vectors instead of peft's ones
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def fastpeft_twin(model):
    """The same block with every peft IA3 layer replaced by IA3Linear.from_peft (shared base weights)."""
    inner = model.base_model.model
    twin = TinyBlock.__new__(TinyBlock)
    nn.Module.__init__(twin)
    for name in ("k", "v", "down"):
        setattr(twin, name, IA3Linear.from_peft(getattr(inner, name)))
    twin.up = inner.up
    return twin


@pytest.mark.parametrize("base", ["dense", "dense-bf16", "nf4", "fp4"])
def test_parity_with_peft(base):
    is_4bit = base in ("nf4", "fp4")
    dtype = torch.bfloat16 if base.endswith("bf16") else torch.float32
    model = peft_block(linear4bit(base) if is_4bit else nn.Linear, is_4bit, dtype)
    inner = model.base_model.model
    if is_4bit:
        assert type(inner.k).__module__ == "peft.tuners.ia3.bnb"  # peft's own 4-bit IA3 layer
    twin = fastpeft_twin(model)
    x = torch.randn(3, 7, 64, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_peft, y_fast = model(x1), twin(x2)
    assert y_fast.dtype == y_peft.dtype
    if dtype == torch.bfloat16:
        # Same roundings as peft (base GEMM in bf16, float32 product rounded once): bit-exact.
        assert torch.equal(y_fast, y_peft)
    assert_close(y_fast, y_peft, scale=10)
    g = torch.randn_like(y_peft)
    (y_peft * g).sum().backward()
    (y_fast * g).sum().backward()
    assert_close(x2.grad, x1.grad, scale=10)
    for name in ("k", "v", "down"):
        ours, theirs = getattr(twin, name).ia3_l.grad, getattr(inner, name).ia3_l["default"].grad
        assert ours.dtype == theirs.dtype
        # In bf16 the output side recovers the unscaled output from the rounded y: bf16 tolerance.
        assert_close(ours, theirs, dtype=dtype, scale=10)


def test_peft_state_dict_loads_into_ia3linear():
    model = peft_block()
    state = get_peft_model_state_dict(model)  # keys like "base_model.model.k.ia3_l"
    fresh = IA3Linear(nn.Linear(64, 64), is_feedforward=False)
    assert torch.equal(fresh.ia3_l, torch.ones(64, 1))  # peft's init and shape
    fresh.load_state_dict({"ia3_l": state["base_model.model.k.ia3_l"]}, strict=False)
    assert torch.equal(fresh.ia3_l, model.base_model.model.k.ia3_l["default"])
    ff = IA3Linear(nn.Linear(128, 64), is_feedforward=True)
    assert ff.ia3_l.shape == state["base_model.model.down.ia3_l"].shape == (1, 128)


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_task_bank_layer_equals_single_task_layers(is_feedforward, base):
    T, B, S = 4, 6, 5
    make = linear4bit("nf4") if base == "nf4" else nn.Linear
    lin = make(64, 24)
    bank = IA3Linear(lin, is_feedforward, num_tasks=T)
    with torch.no_grad():
        bank.ia3_l.copy_(1 + 0.3 * torch.randn_like(bank.ia3_l))
    ids = torch.tensor([3, 0, 3, 2, 1, 3])
    x = torch.randn(B, S, 64)
    y = bank(x, ids)
    y.square().sum().backward()
    grad_alone = torch.zeros_like(bank.ia3_l)
    for t in range(T):
        single = IA3Linear(lin, is_feedforward)
        with torch.no_grad():
            single.ia3_l.copy_(bank.ia3_l[t].view_as(single.ia3_l))
        rows = ids == t
        y_t = single(x[rows])
        assert_close(y[rows], y_t, scale=10)
        y_t.square().sum().backward()
        grad_alone[t] = single.ia3_l.grad.flatten()
    assert_close(bank.ia3_l.grad, grad_alone, scale=10)
    with pytest.raises(ValueError, match="pass task_ids"):
        bank(x)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_merge_and_unmerge(is_feedforward):
    lin = nn.Linear(32, 24)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = IA3Linear(lin, is_feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.3 * torch.randn_like(layer.ia3_l))
    x = torch.randn(5, 32)
    y = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(lin.weight, w0)
    assert_close(layer(x), y, scale=10)
    layer.unmerge()
    assert not layer.merged
    assert_close(lin.weight, w0, scale=10)
    assert_close(lin.bias, b0, scale=10)
    assert_close(layer(x), y, scale=10)


def test_merge_rejects_4bit_and_task_banks():
    with pytest.raises(NotImplementedError):
        IA3Linear(linear4bit()(32, 24), False).merge()
    with pytest.raises(ValueError, match="bank of tasks"):
        IA3Linear(nn.Linear(32, 24), False, num_tasks=3).merge()


def test_saves_less_than_peft_on_the_output_side():
    # peft keeps the unscaled base output next to the scaled one it returns; IA3Linear keeps only
    # the output it returns (the vector gradient is recovered as sum(grad * y) / l).
    def saved_activation_ptrs(module, x):
        seen, y = saved_storages(lambda: module(x), exclude=list(module.parameters()))
        return {p: n for p, (_, n) in seen.items()}, y

    model = peft_block()
    peft_k = model.base_model.model.k
    x = torch.randn(4, 16, 64)
    peft_saved, _ = saved_activation_ptrs(peft_k, x)
    ours_saved, y = saved_activation_ptrs(IA3Linear.from_peft(peft_k), x)
    assert ours_saved == {y.untyped_storage().data_ptr(): y.untyped_storage().nbytes()}
    # peft: the unscaled [M, out] output (plus its [out] scaling vector), a second tensor next to y.
    assert max(peft_saved.values()) == y.untyped_storage().nbytes()
    assert y.untyped_storage().data_ptr() not in peft_saved
