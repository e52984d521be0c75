"""fastpeft.ops.dora_linear against the plain-PyTorch reference (peft's DoRA math, term for term) on
every frozen-weight format, its saved-for-backward memory, opcheck and bad input; and the
materialised dropout ops it uses."""

import pytest
import torch

from fastpeft.ops import dora_linear, dora_linear_reference, dropout_reference
from fastpeft.ops.dora import dora_weight_norm_reference
from fastpeft.ops.dropout import dropout_factor_reference
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import frozen_weight_args
from tests.utils import WEIGHT_KINDS, assert_close, assert_error_within, devices, leaf, make_weight, saved_storages, weight_tensors

SEED = torch.tensor([1234], dtype=torch.int64)


def inputs(kind="dense", M=13, K=48, O=40, r=4, dtype=torch.float32, device="cpu", bias=True, seed=0):
    torch.manual_seed(seed)
    w = make_weight(kind, O, K, dtype, device)
    x = torch.randn(1, M, K, dtype=dtype, device=device)  # leading dims are flattened by the op
    A = torch.randn(r, K, dtype=dtype, device=device) / K**0.5
    B = torch.randn(O, r, dtype=dtype, device=device) * 0.1
    b = torch.randn(O, dtype=dtype, device=device) if bias else None
    dense = dense_weight_reference(w, torch.float32)
    m = torch.linalg.vector_norm(dense, dim=1).to(device) * (1 + 0.1 * torch.randn(O, device=device))
    return x, w, b, A, B, m.float()


def run(fn, x, w, b, A, B, m, scaling, p=0.0, **kw):
    leaves = [leaf(t) for t in (x, A, B, m)] + ([leaf(b)] if b is not None else [])
    xl, Al, Bl, ml = leaves[:4]
    bl = leaves[4] if b is not None else None
    out = fn(xl, w, bl, Al, Bl, ml, scaling, p, SEED if p > 0 else None, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_reference(kind, p, bias, device):
    args = inputs(kind, device=device, bias=bias)
    torch.manual_seed(5)
    got = run(dora_linear, *args, 1.5, p)
    torch.manual_seed(5)
    want = run(dora_linear_reference, *args, 1.5, p)
    assert_close(got[0], want[0], scale=10)
    for a, e in zip(got[1], want[1]):
        assert_close(a, e, scale=20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_reference_error(dtype):
    # flash-attention's rule: the fused op's error against float32 is at most 2x (plus a floor) the
    # error of the plain-PyTorch path in the same low precision.
    args = inputs("dense", M=32, K=64, O=48, dtype=dtype)
    ref32 = [t.float() if isinstance(t, torch.Tensor) else t for t in args]
    got = run(dora_linear, *args, 2.0)
    lowp = run(dora_linear_reference, *args, 2.0)
    want = run(dora_linear_reference, *ref32, 2.0)
    assert_error_within(got[0], lowp[0], want[0])
    for a, lo, e in zip(got[1], lowp[1], want[1]):
        assert_error_within(a, lo, e)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_norm_is_peft_weight_norm(kind):
    x, w, b, A, B, m = inputs(kind)
    fmt, tensors, ints = frozen_weight_args([w], x.shape[-1])
    _, _, _, norm = torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, b, A, B, m, 0.7, 0.0, None, None)
    want = dora_weight_norm_reference(dense_weight_reference(w, torch.float32), A, B, 0.7)
    assert_close(norm, want, scale=4)
    # the cached ||W_row||^2 path gives the same norm
    sq = dense_weight_reference(w, torch.float32).square().sum(1)
    _, _, _, norm2 = torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, b, A, B, m, 0.7, 0.0, None, sq)
    assert_close(norm2, want, scale=4)


def test_zero_B_and_magnitude_equal_to_norm_is_the_base_layer():
    # DoRA's init: B = 0 and m = ||W||, so the layer starts as the base layer exactly.
    x, w, b, A, B, _ = inputs("dense")
    B = torch.zeros_like(B)
    m = torch.linalg.vector_norm(w, dim=1)
    out = dora_linear(x, w, b, A, B, m, 2.0)
    assert_close(out, torch.nn.functional.linear(x, w, b), scale=4)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_saves_no_weight_sized_tensor(p):
    M, K, O, r = 64, 96, 80, 4
    x, w, b, A, B, m = inputs("nf4", M=M, K=K, O=O, r=r)
    leaves = [leaf(t) for t in (x, A, B, m)]
    seen, _ = saved_storages(lambda: dora_linear(leaves[0], w, b, *leaves[1:], 1.0, p, SEED if p > 0 else None),
                             exclude=leaves[1:] + weight_tensors(w))  # fmt: skip
    shapes = sorted(s for s, _ in seen.values())
    # x, y (its storage holds the r rows of A W^T too), the shrink and the norm (and the seed); never [O, K].
    expected = sorted([(1, M, K), (M, O), (M, r), (O,)] + ([(1,)] if p > 0 else []))
    assert shapes == expected, shapes
    y_bytes = next(n for s, n in seen.values() if s == (M, O))
    assert y_bytes == (M + r) * O * 4


def test_opcheck():
    from torch.library import opcheck

    x, w, b, A, B, m = inputs("nf4")
    fmt, tensors, ints = frozen_weight_args([w], x.shape[-1])
    for p, seed in ((0.0, None), (0.25, SEED)):
        args = (leaf(x), fmt, tensors, ints, b, leaf(A), leaf(B), leaf(m), 1.5, p, seed, None)
        opcheck(torch.ops.fastpeft.dora_linear, args)
    out, y, shrink, norm = torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, b, A, B, m, 1.5, 0.0, None, None)
    op = torch.ops.fastpeft.dora_linear_backward
    opcheck(op, (torch.randn_like(out), x, y, shrink, norm, fmt, tensors, ints, A, B, m, 1.5, 0.0, None,
                 [True, True, True]), test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_bad_input_is_named():
    x, w, b, A, B, m = inputs("dense")
    with pytest.raises(RuntimeError, match="magnitude must be \\[40\\]"):
        dora_linear(x, w, b, A, B, m[:-1], 1.0)
    with pytest.raises(RuntimeError, match="lora_B must be \\[40, 4\\]"):
        dora_linear(x, w, b, A, B.t().contiguous(), m, 1.0)
    with pytest.raises(RuntimeError, match="lora_A must be Float .the dtype of x"):
        dora_linear(x, w, b, A.half(), B, m, 1.0)
    with pytest.raises(RuntimeError, match="frozen"):
        dora_linear(x, w.clone().requires_grad_(), b, A, B, m, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, w, b, A, B, m, 1.0, dropout_p=1.0)
    fmt, tensors, ints = frozen_weight_args([w], x.shape[-1])
    with pytest.raises(RuntimeError, match="needs a seed"):
        torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, b, A, B, m, 1.0, 0.1, None, None)
    with pytest.raises(RuntimeError, match="weight_sq_norm must be a float32 \\[40\\]"):
        torch.ops.fastpeft.dora_linear(x, fmt, tensors, ints, b, A, B, m, 1.0, 0.0, None, m[:3])


# ---- the materialised dropout ops ------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_apply_is_the_reference_mask(dtype, device):
    x = torch.randn(37, 19, dtype=dtype, device=device)
    got = torch.ops.fastpeft.dropout_apply(x, 0.3, SEED)
    assert torch.equal(got, dropout_reference(x, 0.3, SEED))
    acc = torch.randn_like(x)
    factor = dropout_factor_reference(x.numel(), 0.3, SEED, device).view(x.shape)
    want = (acc.float() + x.float() * factor).to(dtype)  # float32 math, rounded once
    torch.ops.fastpeft.dropout_apply_add_(acc, x, 0.3, SEED)
    assert torch.equal(acc, want)


def test_dropout_ops_opcheck_and_errors():
    from torch.library import opcheck

    x = torch.randn(8, 5)
    opcheck(torch.ops.fastpeft.dropout_apply, (x, 0.2, SEED))
    opcheck(torch.ops.fastpeft.dropout_apply_add_, (torch.randn(8, 5), x, 0.2, SEED))
    with pytest.raises(RuntimeError, match="x must have out's shape"):
        torch.ops.fastpeft.dropout_apply_add_(torch.randn(8, 4), x, 0.2, SEED)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.fastpeft.dropout_apply(x, 1.5, SEED)
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        torch.ops.fastpeft.dropout_apply(x, 0.2, torch.tensor([1.0]))
