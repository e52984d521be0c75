"""Test helpers: tolerances per dtype, the devices to run on, frozen weights of every format, and
saved-for-backward accounting."""

import pytest
import torch
from torch import nn

from fastpeft.quant import Int8Weight, Quant4bitWeight

# rtol, atol per dtype (vLLM's allclose_default); exact 0/0 where the math is identical.
TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-3),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def devices():
    """CPU always; CUDA as a parameter marked `cuda` (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """assert_close with the dtype's tolerance, widened by ``scale`` for long reductions."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=msg or None)


def assert_all_close(got, expected, scale=10.0):
    """Pairwise ``assert_close`` (fp32 tolerance widened by ``scale``) of an output and its gradients:
    ``got`` and ``expected`` are (y, [grads]) as the op tests' ``run`` helpers return them."""
    (y, grads), (y_ref, grads_ref) = got, expected
    assert_close(y, y_ref, scale=scale)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, scale=scale)


def assert_error_within(actual, reference_lowp, reference_fp32, factor=2.0, floor=None):
    """GEMM-like ops in low precision: the kernel's error against an fp32 reference may be at most
    ``factor`` x the error of the plain-PyTorch low-precision path (flash-attention's rule)."""
    assert actual.shape == reference_fp32.shape, (actual.shape, reference_fp32.shape)
    if actual.numel() == 0:
        return
    err = (actual.float() - reference_fp32.float()).abs().max().item()
    base = (reference_lowp.float() - reference_fp32.float()).abs().max().item()
    if floor is None:
        floor = TOLERANCES[actual.dtype][1] * max(1.0, reference_fp32.abs().max().item())
    assert err <= factor * base + floor, f"kernel error {err:.3g} vs reference low-precision error {base:.3g}"


def signed_zero_canonical(t: torch.Tensor) -> torch.Tensor:
    """Raw bits with -0.0 turned into +0.0, for bit-exact comparisons that ignore the sign of zero."""
    t = t + 0.0  # -0.0 + 0.0 == +0.0; every other value is unchanged
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def saved_tensors(fn):
    """Every tensor autograd saves for backward while ``fn`` runs (in order), and fn's result."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def saved_storages(fn, exclude=()):
    """{data_ptr: (shape, storage bytes)} of every storage autograd saves while ``fn`` runs, storages
    of ``exclude`` (parameters, frozen weights) skipped, and fn's result."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved, out = saved_tensors(fn)
    seen = {}
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
    return seen, out


def saved_tensor_bytes(fn, exclude=()):
    """Bytes autograd saves for backward while ``fn`` runs: each storage counted once, storages of
    ``exclude`` (parameters, frozen weights) skipped. Returns (bytes, list of saved shapes, fn's result)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved, out = saved_tensors(fn)
    kept = [t for t in saved if t.untyped_storage().data_ptr() not in skip]
    nbytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(nbytes.values()), [tuple(t.shape) for t in kept], out


# Frozen-weight formats every linear op takes: dense, bitsandbytes 4-bit (plain and double-quantized)
# and bitsandbytes int8 row-wise.
WEIGHT_KINDS = ["dense", "nf4", "fp4-nested", "int8"]


def make_weight(kind, out_f, in_f, dtype, device, quantize_dtype=torch.float32):
    """A random frozen [out_f, in_f] weight of ``kind``: "dense" (a tensor of ``dtype``), "nf4" /
    "fp4" (optionally "-nested": double-quantized absmax; quantized by bitsandbytes, blocksize 64,
    from ``quantize_dtype`` values) or "int8" (bitsandbytes' row-wise layout)."""
    dense = torch.randn(out_f, in_f) / in_f**0.5
    if kind == "dense":
        return dense.to(dtype=dtype, device=device)
    if kind == "int8":
        scale = dense.abs().amax(1).clamp_min(1e-3).float()
        data = torch.round(dense * 127 / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Weight(data=data, scale=scale).to(device)
    import bitsandbytes.functional as BF

    quant_type = kind.split("-")[0]
    packed, state = BF.quantize_4bit(dense.to(quantize_dtype), blocksize=64, quant_type=quant_type,
                                     compress_statistics=kind.endswith("nested"))  # fmt: skip
    return Quant4bitWeight.from_bnb(packed, state).to(device)


def weight_tensors(w) -> list:
    """The tensors a frozen weight of any format holds (to exclude them from saved-activation counts)."""
    if isinstance(w, torch.Tensor):
        return [w]
    return [t for t in vars(w).values() if isinstance(t, torch.Tensor)]


def leaf(t):
    """A fresh leaf copy of ``t`` that requires grad."""
    return t.detach().clone().requires_grad_(True)


class OneLayer(nn.Module):
    """A model of one layer named ``proj``, for peft configs with ``target_modules=["proj"]``."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)
