"""Sparse-delta ops against their plain-PyTorch references: the delta added while dequantizing
(bit-exact), the sampled weight gradient, the fused linear forward/backward, saved tensors,
opcheck and bad input."""

import pytest
import torch

from fastpeft.ops import sparse_delta_linear, sparse_delta_linear_reference
from fastpeft.ops.sparse_delta import merged_weight, merged_weight_reference
from fastpeft.quant import frozen_weight_args
from tests.utils import (DTYPES, WEIGHT_KINDS, assert_all_close, assert_close, assert_error_within, devices, leaf,
                         make_weight, saved_tensors, signed_zero_canonical, weight_tensors)  # fmt: skip

BF = pytest.importorskip("bitsandbytes.functional")


def random_indices(numel, k, dtype=torch.int32, device="cpu", seed=0, ends=True):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=gen)[:k]
    if ends and numel >= 2 and k >= 2:  # always include the first and last element
        idx[0], idx[1] = 0, numel - 1
        idx = idx.unique()
    return idx.sort().values.to(dtype=dtype, device=device)


KINDS = WEIGHT_KINDS


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape,k", [((37, 29), 50), ((64, 128), 1), ((16, 8), 0), ((3, 5), 15)], ids=str)
def test_merged_weight_is_bit_exact(device, dtype, kind, index_dtype, shape, k):
    w = make_weight(kind, *shape, dtype, device, quantize_dtype=dtype)
    idx = random_indices(shape[0] * shape[1], k, index_dtype, device)
    values = torch.randn(idx.numel(), device=device) * 0.1
    got = merged_weight(w, idx, values, dtype)
    expected = merged_weight_reference(w, idx, values, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(signed_zero_canonical(got), signed_zero_canonical(expected))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_tokens", [0, 3, 8])
@pytest.mark.parametrize("path", ["sddmm", "dense"])
def test_weight_grad_equals_dense_gradient_gathered(device, dtype, chunk_tokens, path, monkeypatch):
    """Both weight-gradient paths (the sampled product, and above the density crossover one dense
    GEMM + gather; FASTPEFT_SDDMM_CROSSOVER forces either) against the dense gradient gathered."""
    monkeypatch.setenv("FASTPEFT_SDDMM_CROSSOVER", "2.0" if path == "sddmm" else "0.0")
    M, O, K = 21, 19, 33  # odd sizes: padded rows, a partial last token chunk
    g = torch.randn(3, 7, O, dtype=dtype, device=device)
    x = torch.randn(3, 7, K, dtype=dtype, device=device)
    idx = random_indices(O * K, 200, torch.int64, device)
    got = torch.ops.fastpeft.sparse_delta_weight_grad(g, x, idx, chunk_tokens)
    assert got.dtype == torch.float32 and got.shape == (idx.numel(),)
    dense32 = g.reshape(M, O).float().t() @ x.reshape(M, K).float()
    dense_lowp = (g.reshape(M, O).t() @ x.reshape(M, K)).float()
    assert_error_within(got.to(dtype), dense_lowp.view(-1)[idx], dense32.view(-1)[idx])


@pytest.mark.parametrize("device", devices())
def test_weight_grad_of_empty_batch_is_zero(device):
    g, x = torch.randn(0, 4, device=device), torch.randn(0, 6, device=device)
    idx = torch.tensor([0, 5, 23], device=device)
    assert torch.equal(torch.ops.fastpeft.sparse_delta_weight_grad(g, x, idx), torch.zeros(3, device=device))


def run(fn, x, w, b, idx, values, grad_out):
    leaves = [t for t in (x, b, values) if t is not None]
    y = fn(x, w, b, idx, values)
    return y, torch.autograd.grad(y, leaves, grad_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead,out_f,in_f,k", [((5,), 96, 123, 300), ((2, 3), 64, 64, 1), ((0,), 32, 48, 10)], ids=str)
def test_linear_matches_reference(device, dtype, kind, bias, lead, out_f, in_f, k):
    w = make_weight(kind, out_f, in_f, dtype, device, quantize_dtype=dtype)
    idx = random_indices(out_f * in_f, k, torch.int32, device)
    values = leaf(torch.randn(idx.numel(), device=device) * 0.05)  # float32 values, any compute dtype
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    b = leaf(torch.randn(out_f, dtype=dtype, device=device)) if bias else None
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)
    y, grads = run(sparse_delta_linear, x, w, b, idx, values, g)
    y_ref, grads_ref = run(sparse_delta_linear_reference, x, w, b, idx, values, g)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert grads[-1].dtype == torch.float32
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    # Low precision: error against float32 math on the same merged weight at most 2x the error of
    # the plain-PyTorch low-precision path.
    w32 = merged_weight_reference(w, idx, values.detach(), dtype).float()
    up = lambda t: None if t is None else leaf(t.detach().float())  # noqa: E731
    x32, b32 = up(x), up(b)
    w32 = leaf(w32)
    y32 = torch.nn.functional.linear(x32, w32, b32)
    leaves32 = [t for t in (x32, b32, w32) if t is not None]
    grads32 = list(torch.autograd.grad(y32, leaves32, g.float()))
    grads32[-1] = grads32[-1].view(-1)[idx.long()]  # dL/dvalues = dL/dW at the indices
    assert_error_within(y, y_ref, y32)
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got.to(dtype), ref.to(dtype), ref32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_values_gradient_equals_dense_weight_gradient_at_the_indices(device, kind):
    out_f, in_f = 40, 56
    w = make_weight(kind, out_f, in_f, torch.float32, device)
    idx = random_indices(out_f * in_f, 111, torch.int64, device)
    values = leaf(torch.randn(idx.numel(), device=device))
    x = torch.randn(4, 9, in_f, device=device)
    g = torch.randn(4, 9, out_f, device=device)
    (grad_values,) = torch.autograd.grad(sparse_delta_linear(x, w, None, idx, values), values, g)
    dense_w = leaf(merged_weight_reference(w, idx, values.detach(), torch.float32))
    (dense_grad,) = torch.autograd.grad(torch.nn.functional.linear(x, dense_w), dense_w, g)
    assert_close(grad_values, dense_grad.view(-1)[idx], scale=10)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input(device):
    x = leaf(torch.randn(48, 3, 5, device=device)).permute(1, 2, 0)
    w = torch.randn(24, 48, device=device)
    idx = random_indices(24 * 48, 60, torch.int32, device)
    values = leaf(torch.randn(idx.numel(), device=device))
    g = torch.randn(3, 5, 24, device=device)
    y, grads = run(sparse_delta_linear, x, w, None, idx, values, g)
    y_ref, grads_ref = run(sparse_delta_linear_reference, x, w, None, idx, values, g)
    assert_close(y, y_ref, scale=10)
    for got, ref in zip(grads, grads_ref):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("kind", KINDS)
def test_saves_only_x_indices_and_values(kind):
    out_f, in_f, M = 256, 128, 6
    w = make_weight(kind, out_f, in_f, torch.float32, "cpu")
    idx = random_indices(out_f * in_f, 100, torch.int32)
    values = leaf(torch.zeros(idx.numel()))
    x = leaf(torch.randn(M, in_f))
    frozen = weight_tensors(w)
    frozen_ptrs = {t.untyped_storage().data_ptr() for t in frozen}
    saved, y = saved_tensors(lambda: sparse_delta_linear(x, w, None, idx, values))
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in frozen_ptrs)
    assert activation_bytes == x.numel() * 4 + idx.numel() * 4 + values.numel() * 4
    assert all(t.numel() < out_f * in_f or t.untyped_storage().data_ptr() in frozen_ptrs for t in saved)
    y.sum().backward()
    assert values.grad.shape == values.shape


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    ops = torch.ops.fastpeft
    x = torch.randn(2, 3, 32, device=device, requires_grad=requires_grad)
    w = torch.randn(16, 32, device=device)
    b = torch.randn(16, device=device, requires_grad=requires_grad)
    idx = random_indices(16 * 32, 40, torch.int32, device)
    values = torch.randn(idx.numel(), device=device, requires_grad=requires_grad)
    for kind in WEIGHT_KINDS:
        weight = frozen_weight_args([w if kind == "dense" else make_weight(kind, 16, 32, torch.float32, device)])
        torch.library.opcheck(ops.sparse_delta_linear, (x, *weight, b, idx, values))
        torch.library.opcheck(ops.sparse_delta_linear, (x, *weight, None, idx, values))


@pytest.mark.parametrize("device", devices())
def test_opcheck_building_blocks(device):
    ops = torch.ops.fastpeft
    idx = random_indices(16 * 32, 40, torch.int64, device)
    values = torch.randn(idx.numel(), device=device)
    x, g = torch.randn(5, 32, device=device), torch.randn(5, 16, device=device)
    w = torch.randn(16, 32, device=device)
    torch.library.opcheck(ops.sparse_delta_add_, (w.clone(), idx, values))
    torch.library.opcheck(ops.sparse_delta_weight_grad, (g, x, idx))
    torch.library.opcheck(ops.sparse_delta_linear_backward, (g, x, "dense", [w], [], idx, values, [True, True, True]))
    torch.library.opcheck(ops.sparse_delta_linear_backward, (g, x, "dense", [w], [], idx, values, [False, True, False]))
    qw = make_weight("fp4", 16, 32, torch.float32, device)
    quant = (qw.packed, qw.absmax, None, None, None, 64, 256, "fp4")
    torch.library.opcheck(ops.dequantize_4bit_add_delta_, (*quant, idx, values, torch.empty(16, 32, device=device)))
    for kind in ("fp4", "int8"):
        weight = frozen_weight_args([make_weight(kind, 16, 32, torch.float32, device)])
        torch.library.opcheck(ops.sparse_delta_linear_backward, (g, x, *weight, idx, values, [True, True, False]))


def test_bad_input_errors_name_the_argument():
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    idx, values = torch.tensor([1, 5, 9], dtype=torch.int32), torch.randn(3)
    cases = [
        (dict(values=torch.randn(4)), r"values must have one entry per index \(3\), got 4"),
        (dict(indices=idx.float()), r"indices must be int32 or int64"),
        (dict(indices=idx.view(1, 3), values=values), r"indices must be 1-D"),
        (dict(values=values.long()), r"values must be float32, float16 or bfloat16"),
        (dict(weight=w.half()), r"weight must be Float"),
        (dict(weight=torch.randn(16, 31)), r"weight must be \[out_features, 32\]"),
        (dict(bias=torch.randn(15)), r"bias must be \[16\]"),
        (dict(x=x.long()), r"x must be float32, float16 or bfloat16"),
        (dict(indices=torch.arange(600, dtype=torch.int32), values=torch.randn(600)), r"600 indices cannot be unique"),
    ]
    base = dict(x=x, weight=w, bias=None, indices=idx, values=values)
    for change, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            sparse_delta_linear(**{**base, **change})
    with pytest.raises(ValueError, match="weight must be frozen"):
        sparse_delta_linear(x, leaf(w), None, idx, values)
    qw = make_weight("nf4", 16, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight has shape \(16, 64\) but x has 32 features"):
        sparse_delta_linear(x, qw, None, idx, values)
    with pytest.raises(RuntimeError, match="chunk_tokens must be >= 0"):
        torch.ops.fastpeft.sparse_delta_weight_grad(torch.randn(4, 16), x, idx, -1)


def test_out_of_range_indices_are_never_written():
    out = torch.zeros(20)
    view = out[:10]
    torch.ops.fastpeft.sparse_delta_add_(view, torch.tensor([3, 12]), torch.tensor([1.0, 1.0]))
    assert out.tolist() == [0, 0, 0, 1] + [0] * 16


# ---- C++ autograd (csrc/sparse_delta/sparse_delta_autograd.cpp) --------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["x", "values", "bias"])
def test_gradient_of_one_input_alone(kind, which):
    """needs_input_grad is honoured per input: the one gradient equals the reference's, the rest stay None."""
    out_f, in_f = 24, 64
    w = make_weight(kind, out_f, in_f, torch.float32, "cpu")
    idx = random_indices(out_f * in_f, 90, torch.int32)
    x0, v0, b0 = torch.randn(3, 5, in_f), torch.randn(idx.numel()) * 0.1, torch.randn(out_f)

    def go(fn):
        x, v, b = (t.clone().requires_grad_(which == name) for t, name in ((x0, "x"), (v0, "values"), (b0, "bias")))
        fn(x, w, b, idx, v).square().sum().backward()
        return x, v, b

    got, want = go(sparse_delta_linear), go(sparse_delta_linear_reference)
    assert sum(t.grad is not None for t in got) == 1
    for a, b in zip(got, want):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert_close(a.grad, b.grad, scale=10)


def test_direct_op_call_with_a_trainable_weight_gives_it_no_gradient():
    """As with the Python autograd before: called directly, the op does not train the dense weight."""
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    idx, values = random_indices(16 * 32, 20), torch.randn(20, requires_grad=True)
    torch.ops.fastpeft.sparse_delta_linear(x, "dense", [w], [], None, idx, values).sum().backward()
    assert w.grad is None and x.grad is not None and values.grad is not None


@pytest.mark.parametrize("kind", ["dense", "nf4", "int8"])
def test_autograd_is_the_cpp_kernel(kind):
    """No Python autograd remains on the ops: the graph node is the C++ Function, and the Autograd
    dispatch key holds a kernel registered from C++ (a Python register_autograd would replace it)."""
    w = make_weight(kind, 16, 32, torch.float32, "cpu")
    idx, values = random_indices(16 * 32, 20), torch.randn(20, requires_grad=True)
    y = sparse_delta_linear(torch.randn(4, 32), w, None, idx, values)
    assert "SparseDeltaLinear" in y.grad_fn.name()
    for op in ("sparse_delta_linear",):
        dump = torch._C._dispatch_dump(f"fastpeft::{op}")
        autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
        assert autograd and all("sparse_delta_autograd.cpp" in line for line in autograd), dump
