"""Fused linear cross-entropy against transformers' way (whole logits, then float32 cross-entropy):
dense / 4-bit / int8 heads, LoRA on the head, softcapping, ignore_index, mean / sum, chunking,
dtypes; opcheck; no [tokens, vocab] tensor saved for backward; bad input."""

import pytest
import torch

from fastpeft.ops import linear_cross_entropy, linear_cross_entropy_reference
from fastpeft.quant import frozen_weight_args
from tests.utils import WEIGHT_KINDS, assert_close, assert_error_within, devices, leaf, make_weight, saved_tensor_bytes


def inputs(N, H, V, dtype, device, kind="dense", lora=False, ignore=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = leaf((torch.randn(N, H, generator=g) * 0.5).to(dtype=dtype, device=device))
    weight = make_weight(kind, V, H, dtype, device)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore] = -100
    A = B = None
    if lora:
        A = leaf((torch.randn(4, H, generator=g) / H**0.5).to(dtype=dtype, device=device))
        B = leaf((torch.randn(V, 4, generator=g) * 0.1).to(dtype=dtype, device=device))
    return hidden, weight, labels.to(device), A, B


def run(fn, hidden, weight, labels, A, B, **kw):
    leaves = [t for t in (hidden, A, B) if t is not None]
    loss = fn(hidden, weight, labels, lora_A=A, lora_B=B, lora_scaling=0.5, **kw)
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference_fp32(device, kind, lora, softcap, reduction):
    hidden, weight, labels, A, B = inputs(37, 48, 101, torch.float32, device, kind, lora)
    kw = dict(softcap=softcap, reduction=reduction)
    loss, grads = run(linear_cross_entropy, hidden, weight, labels, A, B, chunk_tokens=8, **kw)  # 5 chunks, last partial
    loss_ref, grads_ref = run(linear_cross_entropy_reference, hidden, weight, labels, A, B, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_ref, scale=10)
    for got, ref in zip(grads, grads_ref):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_error_of_the_unfused_path(device, dtype):
    hidden, weight, labels, A, B = inputs(40, 64, 300, dtype, device, "dense", lora=True)
    loss, grads = run(linear_cross_entropy, hidden, weight, labels, A, B, chunk_tokens=16)
    loss_ref, grads_ref = run(linear_cross_entropy_reference, hidden, weight, labels, A, B)
    up = [leaf(t.detach().float()) for t in (hidden, A, B)]
    loss32, grads32 = run(linear_cross_entropy_reference, up[0], weight.float(), labels, up[1], up[2])
    assert_error_within(loss.reshape(1).to(dtype), loss_ref.reshape(1).to(dtype), loss32.reshape(1))
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert got.dtype == dtype
        assert_error_within(got, ref, ref32)


@pytest.mark.parametrize("chunk_tokens", [0, 1, 7, 1000])
def test_chunking_does_not_change_the_result(chunk_tokens):
    hidden, weight, labels, A, B = inputs(30, 32, 57, torch.float32, "cpu", lora=True)
    loss, grads = run(linear_cross_entropy, hidden, weight, labels, A, B, chunk_tokens=chunk_tokens)
    loss1, grads1 = run(linear_cross_entropy, hidden, weight, labels, A, B, chunk_tokens=30)
    assert_close(loss, loss1)
    for a, b in zip(grads, grads1):
        assert_close(a, b)


def test_every_token_ignored_gives_nan_like_torch_and_zero_gradients():
    hidden, weight, labels, _, _ = inputs(6, 16, 11, torch.float32, "cpu", ignore=1.1)
    loss, (grad,) = run(linear_cross_entropy, hidden, weight, labels, None, None)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0.0


def test_leading_shape_and_a_frozen_bias():
    hidden = leaf(torch.randn(2, 5, 24))
    weight, bias = torch.randn(40, 24), torch.randn(40)
    labels = torch.randint(0, 40, (2, 5))
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
    ref = linear_cross_entropy_reference(hidden, weight, labels, bias=bias)
    assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss * 3.0, hidden)  # the incoming gradient scales the saved one
    (g_ref,) = torch.autograd.grad(ref * 3.0, hidden)
    assert_close(g, g_ref)


def test_saves_no_vocab_sized_tensor():
    N, H, V = 64, 32, 4096
    hidden, weight, labels, A, B = inputs(N, H, V, torch.float32, "cpu", lora=True)
    nbytes, shapes, _ = saved_tensor_bytes(lambda: linear_cross_entropy(hidden, weight, labels, lora_A=A, lora_B=B,
                                                                        chunk_tokens=16))  # fmt: skip
    # grad_hidden [N, H] and the LoRA factors' gradients; the reference saves N x V logits.
    assert nbytes == (N * H + A.numel() + B.numel()) * 4, shapes
    assert all(V not in s or s == tuple(B.shape) for s in shapes), shapes
    ref_bytes, _, _ = saved_tensor_bytes(lambda: linear_cross_entropy_reference(hidden, weight, labels, lora_A=A, lora_B=B))
    assert ref_bytes >= N * V * 4


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["dense", "nf4", "int8"])
def test_opcheck(device, kind):
    ops = torch.ops.fastpeft
    hidden, weight, labels, A, B = inputs(9, 32, 20, torch.float32, device, kind, lora=True)
    w = frozen_weight_args([weight])
    for mask in ([True, True], [False, False]):
        torch.library.opcheck(ops.linear_cross_entropy, (hidden.detach(), *w, None, labels, A.detach(), B.detach(), 0.5,
                                                         -100, "mean", 0.0, 4, mask))  # fmt: skip
    torch.library.opcheck(ops.linear_cross_entropy, (hidden.detach(), *w, None, labels, None, None, 1.0, -100, "sum",
                                                     2.0, 0, [True, False]))  # fmt: skip
    logits = torch.randn(9, 20, device=device)
    loss = torch.empty(9, device=device)
    torch.library.opcheck(ops.cross_entropy_rows_, (logits, labels, loss, 0.0, -100, 0.1))


def test_bad_input_errors_name_the_argument():
    hidden, weight, labels, A, B = inputs(6, 16, 11, torch.float32, "cpu", ignore=0.0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="lora_A and lora_B must be given together"):
        linear_cross_entropy(hidden, weight, labels, lora_A=torch.randn(2, 16))
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="head weight as frozen"):
        linear_cross_entropy(hidden, weight.clone().requires_grad_(True), labels)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 11 is neither ignore_index \(-100\) nor a class in \[0, 11\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 11, 3, 4, 5]))
    with pytest.raises(RuntimeError, match=r"lora_B must be \[11, 4\]"):
        linear_cross_entropy(hidden, weight, labels, lora_A=torch.randn(4, 16), lora_B=torch.randn(10, 4))
    with pytest.raises(RuntimeError, match=r"weight must be \[out_features, 16\]"):
        linear_cross_entropy(hidden, torch.randn(11, 15), labels)
