"""4-bit dequantization: bit-exact with bitsandbytes, no copy of the packed weight, clear errors."""

import dataclasses

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from fastpeft.ops.quant4bit import FP4_CODE, NF4_CODE, dequantize_4bit, dequantize_4bit_reference  # noqa: E402
from fastpeft.quant import SUPPORTED_BLOCKSIZES, Quant4bitWeight  # noqa: E402
from tests.utils import DTYPES, devices, signed_zero_canonical  # noqa: E402


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit. On the CPU, when quantization blocks straddle rows (in_features
    not a multiple of blocksize), bitsandbytes 0.50's native kernel indexes blocks per row and
    disagrees with the flat layout its own quantizer writes (and its CUDA kernel and Python
    fallback read); there we compare with that Python fallback, bitsandbytes' reference path."""
    rows_straddle = state.shape[-1] % state.blocksize != 0
    if packed.device.type != "cpu" or not rows_straddle:
        return BF.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip its torch.compile
    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = BF.get_4bit_type(state.quant_type, device=packed.device)
    return eager(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def quantize(shape, quant_type, blocksize, nested, dtype, device="cpu"):
    w = torch.randn(shape, dtype=dtype, device=device)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state, Quant4bitWeight.from_bnb(packed, state)


def test_code_books_match_bitsandbytes():
    nf4 = BF.get_4bit_type("nf4", device="cpu")
    fp4 = BF.get_4bit_type("fp4", device="cpu")
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), nf4)
    ours = torch.tensor(FP4_CODE, dtype=torch.float32)
    assert torch.equal(ours, fp4)  # equal values; entry 8 is -0.0 like bitsandbytes' native kernels
    assert torch.signbit(ours[8]) and not torch.signbit(ours[0])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_dequantize_bit_exact_with_bitsandbytes(device, quant_type, nested, dtype, blocksize):
    for shape in [(431, 124), (431, 123), (3, 5), (40, 4096)]:
        packed, state, qw = quantize(shape, quant_type, blocksize, nested, dtype, device)
        expected = bnb_dequantize(packed, state)
        got = dequantize_4bit(qw)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        if quant_type == "nf4":
            # NF4's zero code is +0.0 on every bitsandbytes path: raw bits must agree.
            assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8)), shape
        else:
            # FP4 code 8 is -0.0 in bitsandbytes' native kernels but +0.0 in its Python fallback
            # (odd last dim, or blocksize >= 2048 on AVX-512): bits agree up to the sign of zero.
            assert torch.equal(signed_zero_canonical(got), signed_zero_canonical(expected)), shape
        # Against our own reference the raw bits agree, signed zeros included.
        assert torch.equal(got.view(torch.uint8), dequantize_4bit_reference(qw).view(torch.uint8))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_code_matches_bitsandbytes(device, quant_type):
    # Every byte value, so every nibble, FP4's -0.0 (code 8) included.
    packed = torch.arange(256, dtype=torch.uint8, device=device).repeat(16).view(-1, 1)  # 64 x 128 weights
    absmax = torch.rand(128, device=device) + 0.5
    code = BF.get_4bit_type(quant_type, device=device)
    state = BF.QuantState(absmax=absmax, shape=torch.Size([64, 128]), code=code, blocksize=64,
                          quant_type=quant_type, dtype=torch.float32)  # fmt: skip
    expected = BF.dequantize_4bit(packed, state)
    got = dequantize_4bit(Quant4bitWeight.from_bnb(packed, state))
    if quant_type == "fp4":
        # Per 256 bytes each nibble position holds code 0 in 16 bytes and code 8 in 16. fastpeft
        # writes code 8 as -0.0, as bitsandbytes' CUDA kernel does (lut * sign); its CPU kernel
        # writes -0.0 on its scalar path and +0.0 on its AVX-512 path.
        assert (got == 0).sum() == 16 * 64 and torch.signbit(got[got == 0]).sum() == 16 * 32
    if device == "cuda" or quant_type == "nf4":
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    else:
        assert torch.equal(signed_zero_canonical(got), signed_zero_canonical(expected))


def test_nested_blocksize_other_than_256():
    w = torch.randn(300, 64)
    packed, state = BF.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=False)
    offset = state.absmax.mean()
    qabsmax, state2 = BF.quantize_blockwise(state.absmax - offset, blocksize=128)
    qw = Quant4bitWeight(
        packed=packed.view(-1), absmax=qabsmax, shape=(300, 64), blocksize=32, quant_type="nf4", dtype=torch.float32,
        nested_absmax=state2.absmax, nested_code=state2.code, nested_offset=offset.reshape(1), nested_blocksize=128,
    )  # fmt: skip
    nested_state = BF.QuantState(
        absmax=qabsmax, shape=state.shape, code=state.code, blocksize=32, quant_type="nf4", dtype=torch.float32,
        offset=offset, state2=state2,
    )  # fmt: skip
    expected = bnb_dequantize(packed, nested_state)
    assert torch.equal(dequantize_4bit(qw).view(torch.int32), expected.view(torch.int32))


def test_from_bnb_reads_params4bit_without_copy():
    layer = bnb.nn.Linear4bit(128, 80, bias=False, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(80, 128), requires_grad=False, quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")
    qw = Quant4bitWeight.from_bnb(layer)  # the layer, its Params4bit and (packed, state) all work
    assert qw.packed.data_ptr() == layer.weight.data_ptr()
    assert qw.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert qw.nested and qw.shape == (80, 128) and qw.blocksize == 64 and qw.quant_type == "nf4"
    assert Quant4bitWeight.from_bnb(layer.weight).packed.data_ptr() == layer.weight.data_ptr()
    expected = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_4bit(qw), expected)


def test_from_bnb_quant_storage_other_than_uint8():
    w = torch.randn(64, 128)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    qw = Quant4bitWeight.from_bnb(packed, state)
    assert qw.packed.dtype == torch.uint8 and qw.packed.data_ptr() == packed.data_ptr()
    assert torch.equal(dequantize_4bit(qw), BF.dequantize_4bit(packed, state))


def test_dequantize_writes_into_caller_buffer():
    _, _, qw = quantize((128, 64), "nf4", 64, True, torch.bfloat16)
    workspace = torch.full((128 * 64,), float("nan"), dtype=torch.float32)
    out = dequantize_4bit(qw, out=workspace)
    assert out is workspace and out.data_ptr() == workspace.data_ptr()
    assert torch.equal(out.view(128, 64), dequantize_4bit_reference(qw, torch.float32))
    # A second, larger workspace slice: the kernel writes exactly numel elements.
    big = torch.full((128 * 64 + 7,), 7.0)
    dequantize_4bit(qw, out=big[: 128 * 64])
    assert torch.equal(big[-7:], torch.full((7,), 7.0))


def test_empty_weight():
    qw = Quant4bitWeight(
        packed=torch.empty(0, dtype=torch.uint8), absmax=torch.empty(0), shape=(0, 64), blocksize=64,
        quant_type="nf4", dtype=torch.float32,
    )  # fmt: skip
    assert dequantize_4bit(qw).shape == (0, 64)


def _valid():
    _, _, qw = quantize((16, 64), "nf4", 64, True, torch.float32)
    return qw


def test_bad_input_errors_name_the_argument():
    qw = _valid()
    op = torch.ops.fastpeft.dequantize_4bit_
    args = lambda w: (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.nested_offset, w.blocksize, w.nested_blocksize)  # noqa: E731
    out = torch.empty(16 * 64)
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4' or 'fp4'"):
        op(*args(qw), "int4", out)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        op(qw.packed, qw.absmax, qw.nested_absmax, qw.nested_code, qw.nested_offset, 48, 256, "nf4", out)
    with pytest.raises(RuntimeError, match="out must be float32, float16 or bfloat16"):
        op(*args(qw), "nf4", torch.empty(16 * 64, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        op(*args(qw), "nf4", torch.empty(64, 32).t())
    with pytest.raises(RuntimeError, match="packed holds 512 bytes but a weight of 1000 elements"):
        op(*args(qw), "nf4", torch.empty(1000))
    with pytest.raises(RuntimeError, match="packed must be Byte"):
        op(qw.packed.float(), *args(qw)[1:], "nf4", out)
    with pytest.raises(RuntimeError, match="absmax has 3 entries"):
        op(qw.packed, qw.absmax[:3], *args(qw)[2:], "nf4", out)
    with pytest.raises(RuntimeError, match="must be given together"):
        op(qw.packed, qw.absmax, qw.nested_absmax, None, qw.nested_offset, 64, 256, "nf4", out)
    with pytest.raises(RuntimeError, match="nested_code must have 256 entries"):
        op(qw.packed, qw.absmax, qw.nested_absmax, qw.nested_code[:10], qw.nested_offset, 64, 256, "nf4", out)
    with pytest.raises(RuntimeError, match="absmax must be Float when the absmax is not double-quantized"):
        op(qw.packed, qw.absmax, None, None, None, 64, 256, "nf4", out)
    with pytest.raises(ValueError, match="out has 10 elements"):
        dequantize_4bit(qw, out=torch.empty(10))
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        dataclasses.replace(qw, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        dataclasses.replace(qw, blocksize=100)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    qw = _valid()
    out = torch.empty(16 * 64, device="cuda")
    with pytest.raises(RuntimeError, match="out is on cuda:0 but packed is on cpu"):
        dequantize_4bit(qw, out=out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nested", [False, True])
def test_opcheck(device, nested):
    _, _, qw = quantize((32, 64), "fp4", 64, nested, torch.float16, device)
    out = torch.empty(32 * 64, dtype=torch.float16, device=device)
    args = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_code, qw.nested_offset, 64, 256, "fp4", out)
    torch.library.opcheck(torch.ops.fastpeft.dequantize_4bit_, args)


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar"])
def test_every_cpu_dequant_path_is_bit_exact(path):
    """The CPU kernel picks its AVX-512 / AVX2 / scalar byte loop from the CPU at load time; each one
    (forced by FASTPEFT_CPU_DEQUANT, in a fresh process) gives the reference's raw bits."""
    import os
    import subprocess
    import sys

    script = """
import torch, bitsandbytes.functional as BF
from fastpeft.ops.quant4bit import dequantize_4bit, dequantize_4bit_reference
from fastpeft.quant import Quant4bitWeight
torch.manual_seed(0)
for shape, bs in [((431, 123), 64), ((3, 5), 64), ((40, 4096), 256), ((17, 72), 128)]:
    for qt in ("nf4", "fp4"):
        for nested in (False, True):
            packed, state = BF.quantize_4bit(torch.randn(shape), blocksize=bs, quant_type=qt, compress_statistics=nested)
            qw = Quant4bitWeight.from_bnb(packed, state)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                got, want = dequantize_4bit(qw, dtype=dtype), dequantize_4bit_reference(qw, dtype=dtype)
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (shape, qt, nested, dtype)
print("ok")
"""
    env = dict(os.environ, FASTPEFT_CPU_DEQUANT=path)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
