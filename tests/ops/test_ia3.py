"""(IA)^3 ops against their plain-PyTorch references: scaling, mixed-task banks, the linear op on
dense and 4-bit bases, the folded dequantization, saved tensors, opcheck and bad input."""

import pytest
import torch

from fastpeft.ops import ia3_linear, ia3_linear_reference, ia3_scale, ia3_scale_reference
from fastpeft.ops.ia3 import dequantize_4bit_scaled
from fastpeft.ops.quant4bit import dequantize_4bit_reference
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import frozen_weight_args
from tests.utils import (DTYPES, TOLERANCES, WEIGHT_KINDS, assert_all_close, assert_close, assert_error_within,
                         devices, leaf, make_weight, saved_storages, signed_zero_canonical, weight_tensors)  # fmt: skip

BF = pytest.importorskip("bitsandbytes.functional")

# (x shape [B, ..., d], number of tasks)
SCALE_CASES = [
    ((3, 5, 37), 1),  # odd feature count: the scalar (not 128-bit) path
    ((4, 7, 64), 5),
    ((6, 33), 256),  # 2-D x: one row per example
    ((2, 3, 4, 8), 2),  # 4-D x: rows_per_example = 12
    ((0, 4, 16), 3),  # empty batch
]


def random_tasks(B, T, device):
    return torch.randint(0, T, (B,), device=device)


def vector_bank(T, d, dtype, device):
    # Around 1 like trained (IA)^3 vectors, never exactly 0 (the output-side gradient divides by l).
    return (1.0 + 0.5 * torch.randn(T, d)).to(dtype=dtype, device=device)


def grads_fp32(fn, x, vectors, task_ids, g):
    """Gradients of the plain-PyTorch path computed entirely in float32 (the exact target)."""
    x32, v32 = leaf(x.float()), leaf(vectors.float())
    y = fn(x32, v32, task_ids)
    return torch.autograd.grad(y, (x32, v32), g.float())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vec_dtype", ["float32", "same"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=str)
def test_ia3_scale_matches_reference(device, dtype, vec_dtype, case):
    shape, T = case
    x = leaf(torch.randn(shape, dtype=dtype, device=device))
    vectors = leaf(vector_bank(T, shape[-1], torch.float32 if vec_dtype == "float32" else dtype, device))
    task_ids = random_tasks(shape[0], T, device) if T > 1 else None
    y = ia3_scale(x, vectors, task_ids)
    y_ref = ia3_scale_reference(x, vectors, task_ids)
    # One float32 product rounded once on both paths: bit-exact.
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(signed_zero_canonical(y), signed_zero_canonical(y_ref))
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, vectors), g)
    gx_ref = torch.autograd.grad(y_ref, x, g)[0]
    assert torch.equal(gx, gx_ref)
    _, gv32 = grads_fp32(ia3_scale_reference, x, vectors, task_ids, g)
    assert gv.dtype == vectors.dtype
    # float32 accumulation rounded once to the vectors' dtype.
    rtol, atol = TOLERANCES[vectors.dtype]
    torch.testing.assert_close(gv.float(), gv32.to(vectors.dtype).float(), rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T", [1, 2, 17, 256])
@pytest.mark.parametrize("one_task", [False, True])
def test_mixed_task_batch_equals_each_example_alone(device, T, one_task):
    B, S, d = 9, 6, 40
    x = leaf(torch.randn(B, S, d, device=device))
    vectors = leaf(vector_bank(T, d, torch.float32, device))
    task_ids = torch.full((B,), T - 1, device=device) if one_task else random_tasks(B, T, device)
    y = ia3_scale(x, vectors, task_ids)
    g = torch.randn_like(y)
    gv = torch.autograd.grad(y, vectors, g)[0]
    gv_alone = torch.zeros_like(gv)
    for b in range(B):
        t = int(task_ids[b])
        v_t = leaf(vectors[t : t + 1])
        y_b = ia3_scale(x[b : b + 1], v_t)  # a batch of one with a single task, no task_ids
        assert torch.equal(y[b : b + 1], y_b)
        gv_alone[t] += torch.autograd.grad(y_b, v_t, g[b : b + 1])[0][0]
    assert_close(gv, gv_alone, scale=10)
    unused = torch.ones(T, dtype=torch.bool, device=device)
    unused[task_ids] = False
    assert torch.equal(gv[unused], torch.zeros_like(gv[unused]))  # tasks with no example get exactly 0


@pytest.mark.parametrize("device", devices())
def test_task_ids_on_cpu_and_int32(device):
    x = torch.randn(4, 3, 8, device=device)
    v = vector_bank(3, 8, torch.float32, device)
    ids = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    expected = ia3_scale_reference(x, v, ids.long())
    assert torch.equal(ia3_scale(x, v, ids), expected)
    assert torch.equal(ia3_scale(x, v, ids.to(device)), expected)


@pytest.mark.parametrize("device", devices())
def test_in_place_scale_and_non_contiguous_input(device):
    base = torch.randn(16, 5, 3, device=device)
    x = base.permute(2, 1, 0)  # [3, 5, 16], non-contiguous
    v = vector_bank(4, 16, torch.float32, device)
    ids = torch.tensor([3, 1, 3], device=device)
    assert torch.equal(ia3_scale(x, v, ids), ia3_scale_reference(x.contiguous(), v, ids))
    y = x.contiguous()
    torch.ops.fastpeft.ia3_scale_(y, v, ids)
    assert torch.equal(y, ia3_scale_reference(x.contiguous(), v, ids))


@pytest.mark.cuda
def test_reduction_over_a_long_single_example_on_gpu():
    # One example of many rows and one task: the GPU reduction must split rows into chunks.
    x = torch.randn(1, 20000, 72, device="cuda")
    v = leaf(vector_bank(1, 72, torch.float32, "cuda"))
    y = ia3_scale(x, v)
    g = torch.randn_like(y)
    gv = torch.autograd.grad(y, v, g)[0]
    assert_close(gv, (g * x).sum(dim=(0, 1)).unsqueeze(0), scale=100)


# ---- the linear op ---------------------------------------------------------------------------------


LINEAR_SHAPES = [
    ((5, 3), 123, 97),  # odd features
    ((0, 4), 32, 48),  # empty batch
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "fp4", "int8"])
@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("T", [1, 6])
def test_ia3_linear_matches_reference(device, dtype, shape, kind, is_feedforward, T):
    lead, in_f, out_f = shape
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    weight = make_weight(kind, out_f, in_f, dtype, device)
    bias = torch.randn(out_f, dtype=dtype, device=device)
    vectors = leaf(vector_bank(T, in_f if is_feedforward else out_f, torch.float32, device))
    task_ids = random_tasks(lead[0], T, device) if T > 1 else None
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)

    def run(fn, x, vectors):
        y = fn(x, weight, bias, vectors, task_ids, is_feedforward)
        return y, torch.autograd.grad(y, (x, vectors), g)

    y, grads = run(ia3_linear, x, vectors)
    y_ref, grads_ref = run(ia3_linear_reference, x, vectors)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    # The exact target: a 4-bit weight's true values are float32 (code * absmax); the folded path
    # rounds W * l once, the reference path rounds W, so both are judged against the float32 weight.
    dense_w = dense_weight_reference(weight, torch.float32)
    x32, v32 = leaf(x.float()), leaf(vectors.float())
    y32 = ia3_linear_reference(x32, dense_w.float(), bias.float(), v32, task_ids, is_feedforward)
    grads32 = torch.autograd.grad(y32, (x32, v32), g.float())
    assert_error_within(y, y_ref, y32)
    assert_error_within(grads[0], grads_ref[0], grads32[0])
    # The output side recovers the unscaled output as y / l from the y it keeps: y carries one more
    # rounding than the reference's unscaled output, so allow 3x instead of 2x (the price of not
    # keeping a second [M, out] tensor). The feed-forward side reads x itself: 2x.
    assert_error_within(grads[1], grads_ref[1], grads32[1], factor=2.0 if is_feedforward else 3.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
@pytest.mark.parametrize("is_feedforward", [False, True])
def test_ia3_linear_mixed_tasks_equal_each_example_alone(device, kind, is_feedforward):
    B, S, in_f, out_f, T = 5, 4, 64, 48, 3
    x = leaf(torch.randn(B, S, in_f, device=device))
    weight = make_weight(kind, out_f, in_f, torch.float32, device)
    vectors = leaf(vector_bank(T, in_f if is_feedforward else out_f, torch.float32, device))
    task_ids = torch.tensor([2, 0, 2, 1, 2], device=device)
    y = ia3_linear(x, weight, None, vectors, task_ids, is_feedforward)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, vectors), g)
    gv_alone = torch.zeros_like(gv)
    for b in range(B):
        t = int(task_ids[b])
        x_b, v_t = leaf(x[b : b + 1]), leaf(vectors[t : t + 1])
        # A single task: on the 4-bit base this takes the folded-dequantization path.
        y_b = ia3_linear(x_b, weight, None, v_t, None, is_feedforward)
        assert_close(y[b : b + 1], y_b, scale=10)
        gx_b, gv_b = torch.autograd.grad(y_b, (x_b, v_t), g[b : b + 1])
        assert_close(gx[b : b + 1], gx_b, scale=10)
        gv_alone[t] += gv_b[0]
    assert_close(gv, gv_alone, scale=10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", ["nf4-nested", "fp4"])
@pytest.mark.parametrize("dim", [0, 1])
def test_dequantize_scaled_is_bit_exact(device, dtype, quant, dim):
    for shape in [(37, 123), (64, 64), (3, 5)]:
        qw = make_weight(quant, *shape, dtype, device)
        scale = (1 + 0.5 * torch.randn(shape[dim], device=device)).to(torch.float32)
        got = dequantize_4bit_scaled(qw, scale, dim, dtype)
        w32 = dequantize_4bit_reference(qw, torch.float32)
        expected = (w32 * (scale[:, None] if dim == 0 else scale[None, :])).to(dtype)
        assert torch.equal(signed_zero_canonical(got), signed_zero_canonical(expected))


@pytest.mark.parametrize("device", devices())
def test_output_side_zero_vector_entry_gets_zero_gradient(device):
    # Documented limit: the output side keeps y = pre * l, not pre, so an entry of l that is exactly
    # 0 cannot recover its gradient and gets 0; every other entry is exact.
    x = torch.randn(4, 16, device=device)
    W = torch.randn(8, 16, device=device)
    v = vector_bank(1, 8, torch.float32, device)
    v[0, 3] = 0.0
    v = leaf(v)
    gv = torch.autograd.grad(ia3_linear(x, W, None, v).sum(), v)[0]
    gv_ref = torch.autograd.grad(ia3_linear_reference(x, W, None, v).sum(), v)[0]
    assert gv[0, 3] == 0 and gv_ref[0, 3] != 0
    keep = torch.ones_like(gv, dtype=torch.bool)
    keep[0, 3] = False
    assert_close(gv[keep], gv_ref[keep], scale=10)


# ---- memory: what backward keeps -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
@pytest.mark.parametrize("T", [1, 4])
def test_saved_for_backward(kind, T):
    B, S, in_f, out_f = 4, 8, 64, 32
    x = torch.randn(B, S, in_f, requires_grad=True)
    weight = make_weight(kind, out_f, in_f, torch.float32, "cpu")
    frozen = weight_tensors(weight)
    task_ids = torch.tensor([0, 3, 1, 3]) % T if T > 1 else None
    for is_ff in (False, True):
        vectors = vector_bank(T, in_f if is_ff else out_f, torch.float32, "cpu").requires_grad_(True)
        seen, y = saved_storages(lambda: ia3_linear(x, weight, None, vectors, task_ids, is_ff), exclude=[vectors, *frozen])
        activations = {p: n for p, (_, n) in seen.items()}
        if task_ids is not None:
            activations.pop(task_ids.untyped_storage().data_ptr(), None)
        # Exactly one activation-sized tensor: y itself (output side, no second [M, out] tensor) or x.
        kept = y if not is_ff else x
        assert activations == {kept.untyped_storage().data_ptr(): kept.untyped_storage().nbytes()}


def test_ia3_scale_saves_only_x():
    x = torch.randn(3, 5, 16, requires_grad=True)
    v = vector_bank(2, 16, torch.float32, "cpu").requires_grad_(True)
    ids = torch.tensor([1, 0, 1])
    seen, _ = saved_storages(lambda: ia3_scale(x, v, ids))
    assert set(seen) == {x.untyped_storage().data_ptr(), v.untyped_storage().data_ptr(), ids.untyped_storage().data_ptr()}


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_scale_ops(device, requires_grad):
    ops = torch.ops.fastpeft
    x = torch.randn(3, 4, 16, device=device, requires_grad=requires_grad)
    v = vector_bank(5, 16, torch.float32, device).requires_grad_(requires_grad)
    ids = torch.tensor([4, 0, 4], device=device)
    torch.library.opcheck(ops.ia3_scale, (x, v, ids))
    torch.library.opcheck(ops.ia3_scale, (x, v[:1], None))
    torch.library.opcheck(ops.ia3_scale_, (x.detach().clone(), v.detach(), ids))
    g = torch.randn(3, 4, 16, device=device)
    torch.library.opcheck(ops.ia3_scale_backward, (g, x.detach(), v.detach(), ids, False, [True, True]))
    torch.library.opcheck(ops.ia3_scale_backward, (g, x.detach(), v.detach(), ids, True, [False, True]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("is_feedforward", [False, True])
def test_opcheck_linear_ops(device, requires_grad, is_feedforward):
    ops = torch.ops.fastpeft
    x = torch.randn(3, 4, 64, device=device, requires_grad=requires_grad)
    W = torch.randn(32, 64, device=device)
    b = torch.randn(32, device=device)
    d = 64 if is_feedforward else 32
    for T, ids in ((1, None), (3, torch.tensor([2, 0, 2], device=device))):
        v = vector_bank(T, d, torch.float32, device).requires_grad_(requires_grad)
        for kind in WEIGHT_KINDS:
            weight = frozen_weight_args([W if kind == "dense" else make_weight(kind, 32, 64, torch.float32, device)])
            torch.library.opcheck(ops.ia3_linear, (x, *weight, b, v, ids, is_feedforward))
            y = ops.ia3_linear(x.detach(), *weight, b, v.detach(), ids, is_feedforward)
            saved = x.detach() if is_feedforward else y
            g = torch.randn_like(y)
            for mask in ([True, True], [True, False]):
                torch.library.opcheck(ops.ia3_linear_backward, (g, saved, *weight, v.detach(), ids, is_feedforward, mask))
    qw = make_weight("nf4-nested", 32, 64, torch.float32, device)
    out = torch.empty(32, 64, device=device)
    torch.library.opcheck(
        ops.dequantize_4bit_scaled_,
        (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_code, qw.nested_offset, 64, 256, "nf4",
         torch.rand(64, device=device), 1, out),
    )  # fmt: skip


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    x = torch.randn(4, 3, 16)
    v = vector_bank(3, 16, torch.float32, "cpu")
    ids = torch.tensor([0, 2, 1, 0])
    cases = [
        (dict(task_ids=torch.tensor([0, 3, 1, 0])), r"task_ids\[1\] = 3 is out of range for 3 entries of vectors"),
        (dict(task_ids=torch.tensor([0, -1, 1, 0])), r"task_ids\[1\] = -1 is out of range"),
        (dict(vectors=vector_bank(3, 15, torch.float32, "cpu")), r"vectors must be \[num_tasks, 16\]"),
        (dict(x=x.bfloat16(), vectors=v.half()), r"vectors must be float32 or the dtype of x \(BFloat16\), got Half"),
        (dict(task_ids=ids.float()), r"task_ids must be int64 or int32, got Float"),
        (dict(task_ids=torch.tensor([0, 1])), r"task_ids has 2 entries but x's first \(batch\) dimension is 4"),
        (dict(task_ids=None), r"vectors holds 3 entries, so task_ids .* is required"),
        (dict(x=x.long()), r"x must be float32, float16 or bfloat16"),
    ]
    base = dict(x=x, vectors=v, task_ids=ids)
    for change, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ia3_scale(**{**base, **change})
    W = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match=r"vectors must be \[num_tasks, 8\]"):
        ia3_linear(x, W, None, v, ids)  # output side needs out_features-long vectors
    with pytest.raises(RuntimeError, match=r"weight must be \[out_features, 16\]"):
        ia3_linear(x, torch.randn(8, 15), None, v, ids, is_feedforward=True)
    with pytest.raises(RuntimeError, match=r"weight must be Float"):
        ia3_linear(x, W.double(), None, v, ids, is_feedforward=True)
    with pytest.raises(RuntimeError, match=r"bias must be \[8\]"):
        ia3_linear(x, W, torch.randn(7), v[:, :8].contiguous(), ids)
    with pytest.raises(ValueError, match="treats the base weight as frozen"):
        ia3_linear(x, W.requires_grad_(True), None, v, ids, is_feedforward=True)
    with pytest.raises(RuntimeError, match="scale must be \\[64\\]"):
        dequantize_4bit_scaled(make_weight("nf4", 32, 64, torch.float32, "cpu"), torch.ones(63), 1)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="vectors is on cpu but x is on cuda"):
        ia3_scale(x, torch.ones(1, 8))


def test_direct_op_call_refuses_a_trainable_base_weight():
    """The C++ autograd kernel (csrc/ia3/ia3_autograd.cpp) guards callers of torch.ops directly."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="base weight is frozen"):
        torch.ops.fastpeft.ia3_linear(x, "dense", [weight], [], None, torch.ones(1, 5), None, False)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_gradient_of_vectors_alone_and_of_x_alone(is_feedforward):
    """needs_input_grad is honoured per input: each gradient equals the reference's on its own."""
    x = torch.randn(3, 4, 8)
    weight = torch.randn(6, 8)
    vectors = torch.rand(2, 8 if is_feedforward else 6) + 0.5
    ids = torch.tensor([1, 0, 1])
    for wants_x in (False, True):
        xs, vs = x.clone().requires_grad_(wants_x), vectors.clone().requires_grad_(not wants_x)
        ia3_linear(xs, weight, None, vs, ids, is_feedforward).square().sum().backward()
        xr, vr = x.clone().requires_grad_(wants_x), vectors.clone().requires_grad_(not wants_x)
        ia3_linear_reference(xr, weight, None, vr, ids, is_feedforward).square().sum().backward()
        got, want = (xs.grad, xr.grad) if wants_x else (vs.grad, vr.grad)
        assert (vs.grad if wants_x else xs.grad) is None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
