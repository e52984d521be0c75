"""Test helpers: tolerances per dtype and the devices to run on."""

import pytest
import torch

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


def saved_tensor_bytes(fn, exclude=()):
    """Bytes autograd saves for backward while ``fn`` runs: each storage counted once, storages of
    ``exclude`` (parameters, frozen weights) skipped. Returns (bytes, list of saved shapes)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, shapes = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), shapes, out
