"""Fused LoRA op against its plain-PyTorch reference: dtypes, odd shapes, ranks, dropout, 4-bit."""

import pytest
import torch

from fastpeft.ops import dropout_reference, lora_linear, lora_linear_grouped, lora_linear_reference
from fastpeft.ops.dropout import dropout_factor_reference
from fastpeft.ops.quant4bit import dequantize_4bit_reference
from fastpeft.quant import Quant4bitWeight, frozen_weight_args
from tests.utils import DTYPES, assert_all_close, assert_close, assert_error_within, devices, leaf, make_weight

BF = pytest.importorskip("bitsandbytes.functional")

# (leading shape of x, in_features, out_features, r)
SHAPES = [
    ((5,), 123, 431, 1),
    ((2, 7), 64, 96, 16),
    ((33,), 128, 64, 256),
    ((0,), 32, 48, 4),  # empty batch
]


def run(fn, x, weight, bias, A, B, scaling, p, seed, grad_out):
    """Output and gradients (x, A, B, bias, dense weight) of one forward/backward."""
    leaves = [x, A, B] + ([bias] if bias is not None else [])
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        leaves.append(weight)
    y = fn(x, weight, bias, A, B, scaling, p, seed)
    return y, torch.autograd.grad(y, leaves, grad_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "fp4"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_matches_reference(device, dtype, shape, kind, bias, dropout):
    lead, in_f, out_f, r = shape
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    weight = make_weight(kind, out_f, in_f, dtype, device)
    b = leaf(torch.randn(out_f, dtype=dtype, device=device)) if bias else None
    A = leaf(torch.randn(r, in_f, dtype=dtype, device=device) / in_f**0.5)
    B = leaf(torch.randn(out_f, r, dtype=dtype, device=device) / r**0.5)
    seed = torch.tensor([1234])
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)

    y, grads = run(lora_linear, x, weight, b, A, B, 0.7, dropout, seed, g)
    y_ref, grads_ref = run(lora_linear_reference, x, weight, b, A, B, 0.7, dropout, seed, g)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    # Low precision: error against an fp32 computation on the same (rounded) inputs may be at most
    # 2x the error of the plain-PyTorch low-precision path.
    dense_w = dequantize_4bit_reference(weight, dtype) if isinstance(weight, Quant4bitWeight) else weight
    up = lambda t: None if t is None else leaf(t.detach().float())  # noqa: E731
    y32, grads32 = run(lora_linear_reference, up(x), dense_w.float(), up(b), up(A), up(B), 0.7, dropout, seed, g.float())
    assert_error_within(y, y_ref, y32)
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got, ref, ref32)


@pytest.mark.parametrize("device", devices())
def test_dense_weight_gradient_when_trainable(device):
    x = leaf(torch.randn(6, 40, device=device))
    W = leaf(torch.randn(24, 40, device=device))
    A, B = leaf(torch.randn(4, 40, device=device)), leaf(torch.randn(24, 4, device=device))
    g = torch.randn(6, 24, device=device)
    _, grads = run(lora_linear, x, W, None, A, B, 2.0, 0.1, torch.tensor([3]), g)
    _, grads_ref = run(lora_linear_reference, x, W, None, A, B, 2.0, 0.1, torch.tensor([3]), g)
    assert len(grads) == 4
    for got, ref in zip(grads, grads_ref):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("device", devices())
def test_frozen_inputs_get_no_gradient_work(device):
    # Only the adapter trains: x and W need no gradient; the op must still give A and B theirs.
    x = torch.randn(8, 32, device=device)
    W = torch.randn(16, 32, device=device)
    A, B = leaf(torch.randn(4, 32, device=device)), leaf(torch.randn(16, 4, device=device))
    lora_linear(x, W, None, A, B, 1.0).sum().backward()
    A2, B2 = leaf(A), leaf(B)
    lora_linear_reference(x, W, None, A2, B2, 1.0).sum().backward()
    assert_close(A.grad, A2.grad, scale=10)
    assert_close(B.grad, B2.grad, scale=10)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_and_3d_input(device):
    base = torch.randn(40, 3, 5, device=device)
    x = leaf(base).permute(1, 2, 0)  # [3, 5, 40], non-contiguous
    assert not x.is_contiguous()
    W = torch.randn(24, 40, device=device)
    A, B = leaf(torch.randn(8, 40, device=device)), leaf(torch.randn(24, 8, device=device))
    y = lora_linear(x, W, None, A, B, 0.5, 0.3, torch.tensor([9]))
    y_ref = lora_linear_reference(x.contiguous(), W, None, A, B, 0.5, 0.3, torch.tensor([9]))
    assert_close(y, y_ref, scale=10)
    g = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, g)[0]
    gx_ref = torch.autograd.grad(y_ref, x, g)[0]
    assert gx.shape == x.shape
    assert_close(gx, gx_ref, scale=10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["dense", "nf4-nested"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_multi_projection_equals_separate_calls(device, kind, dropout):
    in_f, outs, ranks = 64, [64, 32, 48], [8, 4, 16]
    x = leaf(torch.randn(2, 9, in_f, device=device))
    Ws = [make_weight(kind, o, in_f, torch.float32, device) for o in outs]
    bs = [leaf(torch.randn(o, device=device)) for o in outs]
    As = [leaf(torch.randn(r, in_f, device=device)) for r in ranks]
    Bs = [leaf(torch.randn(o, r, device=device)) for o, r in zip(outs, ranks)]
    scalings = [0.5, 1.0, 2.0]
    seed = torch.tensor([77])
    ys = lora_linear_grouped(x, Ws, bs, As, Bs, scalings, dropout, seed)
    gs = [torch.randn_like(y) for y in ys]
    leaves = [x, *bs, *As, *Bs]
    grads = torch.autograd.grad(ys, leaves, gs)
    # The same seed gives each separate call the same mask of x, so results agree.
    ys_sep = [lora_linear(x, W, b, A, B, s, dropout, seed) for W, b, A, B, s in zip(Ws, bs, As, Bs, scalings)]
    grads_sep = torch.autograd.grad(ys_sep, leaves, gs)
    for y, y_sep in zip(ys, ys_sep):
        assert_close(y, y_sep, scale=10)
    for got, ref in zip(grads, grads_sep):
        assert_close(got, ref, scale=10)


def test_multi_projection_mixed_biases_keep_gradients():
    x = torch.randn(4, 16)
    Ws = [torch.randn(8, 16), torch.randn(8, 16)]
    b0 = leaf(torch.randn(8))
    As = [leaf(torch.randn(2, 16)) for _ in range(2)]
    Bs = [leaf(torch.randn(8, 2)) for _ in range(2)]
    y0, y1 = lora_linear_grouped(x, Ws, [b0, None], As, Bs, [1.0, 1.0])
    (y0.sum() + y1.sum()).backward()
    assert torch.equal(b0.grad, torch.full((8,), 4.0))
    assert_close(y1, lora_linear_reference(x, Ws[1], None, As[1], Bs[1], 1.0))


# ---- dropout kernels -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_dropout_applies_the_reference_mask_exactly(device, dtype):
    x = torch.randn(37, 50, dtype=dtype, device=device)
    eye = torch.eye(50, dtype=dtype, device=device)  # shrink with A = I returns dropped x itself
    seed = torch.tensor([2024])
    got = torch.ops.fastpeft.lora_shrink_dropout(x, eye, 0.3, seed)
    assert torch.equal(got, dropout_reference(x, 0.3, seed))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R", [(300, 123, 7), (1, 64, 64), (257, 96, 130)])
def test_dropout_kernels_match_reference(device, dtype, M, K, R):
    opts = dict(dtype=dtype, device=device)
    x, A = torch.randn(M, K, **opts), torch.randn(R, K, **opts)
    gu, gx = torch.randn(M, R, **opts), torch.randn(M, K, **opts)
    seed = torch.tensor([-5])
    f = dropout_factor_reference(M * K, 0.4, seed, device).view(M, K)
    xd32 = x.float() * f
    ops = torch.ops.fastpeft
    shrink = ops.lora_shrink_dropout(x, A, 0.4, seed)
    assert_error_within(shrink, (dropout_reference(x, 0.4, seed) @ A.t()), xd32 @ A.float().t())
    grad_A = ops.lora_grad_A_dropout(gu, x, 0.4, seed)
    assert_error_within(grad_A, gu.t() @ dropout_reference(x, 0.4, seed), gu.float().t() @ xd32)
    acc = gx.clone()
    ops.lora_grad_x_dropout_accum_(acc, gu, A, 0.4, seed)
    expected32 = gx.float() + (gu.float() @ A.float()) * f
    assert_error_within(acc, gx + dropout_reference(gu @ A, 0.4, seed), expected32)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    n = 1 << 20
    f = dropout_factor_reference(n, p, torch.tensor([11]))
    kept = (f > 0).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # within 5 sigma
    assert torch.equal(f.unique(), torch.tensor([0.0, 1.0 / (1.0 - p)], dtype=torch.float32))
    other = dropout_factor_reference(n, p, torch.tensor([12]))
    agree = ((f > 0) == (other > 0)).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01  # independent masks for different seeds
    assert torch.equal(f, dropout_factor_reference(n, p, torch.tensor([11])))


def test_dropout_indices_beyond_32_bits_use_the_high_word():
    # Element 2^32 + i must not repeat element i's decision.
    lo = dropout_factor_reference(4096, 0.5, 3)
    idx = torch.arange(4096, dtype=torch.int64) + (1 << 32)
    from fastpeft.ops import dropout as d

    s = 3
    key_lo = d._mix32_int((s & d._M32) + 0x9E3779B9)
    key_hi = d.mix32(0 ^ d.mix32(((idx >> 32) + key_lo) & d._M32))
    h = d.mix32(d.mix32((idx & d._M32) ^ key_lo) ^ key_hi)
    hi = (h >> 8) >= round(0.5 * 16777216)
    assert ((lo > 0) == hi).float().mean().item() < 0.6


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_lora_linear(device, requires_grad, dropout):
    opts = dict(device=device, requires_grad=requires_grad)
    x = torch.randn(2, 5, 32, **opts)
    Ws = [torch.randn(16, 32, device=device), torch.randn(8, 32, device=device)]
    As = [torch.randn(4, 32, **opts), torch.randn(2, 32, **opts)]
    Bs = [torch.randn(16, 4, **opts), torch.randn(8, 2, **opts)]
    bs = [torch.randn(16, **opts), torch.randn(8, **opts)]
    seed = torch.tensor([1]) if dropout else None
    torch.library.opcheck(torch.ops.fastpeft.lora_linear, (x, "dense", Ws, [], bs, As, Bs, [1.0, 0.5], dropout, seed))
    torch.library.opcheck(torch.ops.fastpeft.lora_linear, (x, "dense", Ws[:1], [], [None], As[:1], Bs[:1], [1.0], dropout, seed))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lora_linear_on_a_4bit_weight(device, requires_grad):
    opts = dict(device=device, requires_grad=requires_grad)
    qw = make_weight("nf4-nested", 16, 64, torch.float32, device)
    x = torch.randn(3, 64, **opts)
    A, B, b = torch.randn(4, 64, **opts), torch.randn(16, 4, **opts), torch.randn(16, **opts)
    args = (x, *frozen_weight_args([qw]), [b], [A], [B], [1.5], 0.2, torch.tensor([4]))
    torch.library.opcheck(torch.ops.fastpeft.lora_linear, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward_and_dropout_ops(device):
    x, A, B = torch.randn(6, 32, device=device), torch.randn(4, 32, device=device), torch.randn(16, 4, device=device)
    W = torch.randn(16, 32, device=device)
    outs, shrink = torch.ops.fastpeft.lora_linear(x, "dense", [W], [], [None], [A], [B], [1.0], 0.1, torch.tensor([1]))
    g = torch.randn_like(outs[0])
    ops = torch.ops.fastpeft
    seed = torch.tensor([1])
    dense = ("dense", [W], [])
    torch.library.opcheck(ops.lora_linear_backward, ([g], x, shrink, *dense, [A], [B], [1.0], 0.1, seed, [True, True, True, True]))
    torch.library.opcheck(ops.lora_linear_backward, ([g], x, shrink, *dense, [A], [B], [1.0], 0.1, seed, [False, True, False, False]))
    qw = make_weight("nf4-nested", 16, 32, torch.float32, device)
    torch.library.opcheck(ops.lora_linear_backward,
                          ([g], x, shrink, *frozen_weight_args([qw]), [A], [B], [1.0], 0.1, seed, [True, True, False, True]))  # fmt: skip
    torch.library.opcheck(ops.lora_shrink_dropout, (x, A, 0.5, seed))
    torch.library.opcheck(ops.lora_grad_A_dropout, (shrink, x, 0.5, seed))
    torch.library.opcheck(ops.lora_grad_x_dropout_accum_, (x.clone(), shrink, A, 0.5, seed))


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    x, W = torch.randn(4, 32), torch.randn(16, 32)
    A, B = torch.randn(4, 32), torch.randn(16, 4)
    cases = [
        (dict(lora_A=A.half()), RuntimeError, r"lora_A\[0\] must be Half|lora_A\[0\] must be Float"),
        (dict(lora_A=torch.randn(4, 31)), RuntimeError, r"lora_A\[0\] must be \[r, 32\]"),
        (dict(lora_B=torch.randn(15, 4)), RuntimeError, r"lora_B\[0\] must be \[16, 4\]"),
        (dict(lora_A=torch.randn(0, 32), lora_B=torch.randn(16, 0)), RuntimeError, r"rank r of lora_A\[0\] must be >= 1"),
        (dict(weight=torch.randn(16, 31)), RuntimeError, r"weights\[0\] must be \[out_features, 32\]"),
        (dict(weight=W.double()), RuntimeError, r"weights\[0\] must be Float"),
        (dict(bias=torch.randn(15)), RuntimeError, r"biases\[0\] must be \[16\]"),
        (dict(x=x.long()), RuntimeError, r"x must be float32, float16 or bfloat16"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ]
    base = dict(x=x, weight=W, bias=None, lora_A=A, lora_B=B, scaling=1.0, dropout_p=0.0)
    for change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            lora_linear(**{**base, **change})
    ops = torch.ops.fastpeft
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs a seed"):
        ops.lora_linear(x, "dense", [W], [], [None], [A], [B], [1.0], 0.5, None)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        ops.lora_shrink_dropout(x, A, 0.5, torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="one entry per projection"):
        ops.lora_linear(x, "dense", [W, W], [], [None, None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match="biases must have one entry"):
        ops.lora_linear(x, "dense", [W], [], [None, None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(TypeError, match="all torch.Tensor"):
        lora_linear_grouped(x, [W, make_weight("nf4", 16, 32, torch.float32, "cpu")], None, [A, A], [B, B], [1.0, 1.0])
    qw = make_weight("nf4", 16, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(16, 64\) but x has 32 features"):
        lora_linear(x, qw, None, A, B, 1.0)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    x, W = torch.randn(4, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    with pytest.raises(RuntimeError, match=r"lora_A\[0\] is on cpu but x is on cuda"):
        lora_linear(x, W, None, torch.randn(4, 32), torch.randn(16, 4, device="cuda"), 1.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_no_input_features(device, dropout):
    """in_features = 0 (an empty reduction in the shrink): the LoRA branch adds zeros, with or
    without dropout, and nothing divides by the empty length."""
    x = leaf(torch.randn(5, 0, device=device))
    weight = torch.randn(7, 0, device=device)
    A, B = leaf(torch.randn(3, 0, device=device)), leaf(torch.randn(7, 3, device=device))
    seed = torch.tensor([1234])
    g = torch.randn(5, 7, device=device)
    y, grads = run(lora_linear, x, weight, None, A, B, 0.5, dropout, seed, g)
    y_ref, grads_ref = run(lora_linear_reference, x, weight, None, A, B, 0.5, dropout, seed, g)
    assert y.shape == (5, 7) and not y.any()
    for got, ref in zip(grads, grads_ref):
        assert_close(got, ref)
