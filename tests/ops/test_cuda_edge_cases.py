"""Edge cases of the CUDA kernels that the per-op tests do not reach (issue 16's review list): work
queued on a non-default stream, outputs at addresses that are not 16-byte aligned, and tensors of
more than 2^31 elements (int64 index arithmetic). The misaligned-output cases run on the CPU too."""

import os

import pytest
import torch

from fastpeft.ops import dequantize_4bit, ia3_scale, lora_linear, multi_lora_linear, prefix_attention
from fastpeft.ops.int8 import dequantize_int8
from fastpeft.quant import Int8Weight, Quant4bitWeight
from tests.utils import devices


def random_4bit(numel, device, blocksize=64, quant_type="nf4"):
    """A 4-bit weight from random codes and absmax (no quantizer needed: every byte is a valid pair
    of codes), [numel // 1024, 1024]."""
    packed = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(numel // blocksize, device=device) + 0.5
    return Quant4bitWeight(packed, absmax, (numel // 1024, 1024), blocksize, quant_type, torch.bfloat16)


def random_int8(rows, cols, device):
    data = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device=device)
    return Int8Weight(data, torch.rand(rows, device=device) + 0.5)


@pytest.mark.parametrize("device", devices())
def test_dequantize_into_misaligned_out(device):
    # out one element past a 16-byte boundary: the vector stores must not be used there.
    w4, w8 = random_4bit(64 * 1024, device), random_int8(64, 1000, device)
    for w, dequant in ((w4, dequantize_4bit), (w8, dequantize_int8)):
        aligned = dequant(w, out=torch.empty(w.shape, dtype=torch.bfloat16, device=device))
        storage = torch.full((aligned.numel() + 1,), float("nan"), dtype=torch.bfloat16, device=device)
        shifted = storage[1:].view(w.shape)
        assert shifted.data_ptr() % 16 != 0
        dequant(w, out=shifted)
        assert torch.equal(shifted, aligned.view(w.shape))
        assert torch.isnan(storage[0])  # nothing written before out


def _every_op(after=None):
    """Outputs of one call of each op family (forward and backward) on the current stream; x depends
    on the device scalar ``after`` (times 0) when given, so it exists only once ``after`` does."""
    torch.manual_seed(0)
    dev = "cuda"
    out = {}
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    x = (x if after is None else x + (after * 0).to(x.dtype)).requires_grad_()
    W = torch.randn(128, 256, device=dev, dtype=torch.bfloat16) / 16
    A = (torch.randn(16, 256, device=dev, dtype=torch.bfloat16) / 16).requires_grad_()
    B = (torch.randn(128, 16, device=dev, dtype=torch.bfloat16) / 4).requires_grad_()
    y = lora_linear(x, W, None, A, B, 2.0, 0.1, torch.tensor([3]))
    out["lora"] = [y, *torch.autograd.grad(y.float().square().sum(), (x, A, B))]
    As = [A, (torch.randn(8, 256, device=dev, dtype=torch.bfloat16) / 16).requires_grad_()]
    Bs = [B, (torch.randn(128, 8, device=dev, dtype=torch.bfloat16) / 4).requires_grad_()]
    index = torch.arange(64, device=dev) % 3 - 1
    for path in ("segment", "grouped", "bgmv"):
        os.environ["FASTPEFT_MULTI_LORA_PATH"] = path
        try:
            y = multi_lora_linear(x, W, None, As, Bs, [1.0, 0.5], index)
            out[f"multi_lora_{path}"] = [y, *torch.autograd.grad(y.float().square().sum(), (x, *As, *Bs))]
        finally:
            os.environ.pop("FASTPEFT_MULTI_LORA_PATH")
    vectors = torch.rand(3, 256, device=dev, requires_grad=True)
    y = ia3_scale(x.view(8, 8, 256), vectors, torch.arange(8, device=dev) % 3)
    out["ia3"] = [y, *torch.autograd.grad(y.float().square().sum(), (x, vectors))]
    out["dequant"] = [dequantize_4bit(random_4bit(64 * 1024, dev))]
    q = torch.randn(2, 8, 40, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(2, 2, 40, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    pkv = [torch.randn(3, 2, 16, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    y = prefix_attention(q, *kv, *pkv, torch.tensor([2, 0], device=dev))
    out["prefix"] = [y, *torch.autograd.grad(y.float().square().sum(), (q, *kv, *pkv))]
    return out


@pytest.mark.cuda
def test_every_op_on_a_side_stream():
    # Each kernel must run on the current stream: on a side stream whose inputs were produced by a
    # long queued op, a kernel launched on the default stream would read them before they exist.
    expected = _every_op()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(8):
            busy = busy @ busy / 64  # keeps the side stream busy while the ops are queued behind it
        got = _every_op(after=busy[0, 0])  # no host sync: the ops queue behind the matmuls
    side.synchronize()
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            if name == "prefix":  # the fused attention backward accumulates dq with atomics
                torch.testing.assert_close(a, b, msg=name)
            else:
                assert torch.equal(a, b), name


BIG_ROWS = 2**31 // 4096 + 2  # rows of 4096: two rows past 2^31 elements


@pytest.mark.cuda
def test_tensors_past_2_31_elements():
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~25 GB of GPU memory")
    dev = "cuda"
    # int8 dequant [BIG_ROWS, 4096]: the last rows sit past element 2^31.
    w8 = random_int8(BIG_ROWS, 4096, dev)
    out = dequantize_int8(w8, out=torch.empty(w8.shape, dtype=torch.bfloat16, device=dev))
    tail = (w8.data[-3:].float() * w8.scale[-3:, None] / 127).to(torch.bfloat16)
    assert torch.equal(out[-3:], tail)
    del w8, out
    # 4-bit dequant of > 2^31 elements: the tail equals the dequantization of the tail alone.
    w4 = random_4bit(BIG_ROWS * 4096, dev)
    full = dequantize_4bit(w4).view(-1)
    tail_elems = 4 * 4096
    w_tail = Quant4bitWeight(w4.packed[-tail_elems // 2 :], w4.absmax[-tail_elems // 64 :], (4, 4096), 64, "nf4",
                             torch.bfloat16)  # fmt: skip
    assert torch.equal(full[-tail_elems:], dequantize_4bit(w_tail).view(-1))
    del w4, full
    # (IA)^3 scaling of > 2^31 elements, two tasks.
    x = torch.randn(2, BIG_ROWS // 2, 4096, device=dev, dtype=torch.bfloat16)
    vectors = torch.rand(2, 4096, device=dev)
    y = ia3_scale(x, vectors, torch.tensor([0, 1], device=dev))
    assert torch.equal(y[1, -2:], (x[1, -2:].float() * vectors[1]).to(torch.bfloat16))
