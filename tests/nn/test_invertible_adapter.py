"""fastpeft.nn.InvertibleAdapter (MAD-X invertible adapters): exact invertibility, banks, and parity
with a plain-PyTorch transcription of the adapters library's NICECouplingBlock / GLOWCouplingBlock
(the library itself does not install with this project's transformers 5.17)."""

import pytest
import torch
from torch import nn

from fastpeft.nn import InvertibleAdapter
from tests.utils import assert_close, leaf

KINDS = ["nice", "glow"]


# ---- the plain-PyTorch reference (adapters library's coupling blocks, one example at a time) --------


class RefNICE(nn.Module):
    """adapters.NICECouplingBlock: y1 = x1 + F(x2), y2 = x2 + G(y1); rev undoes it."""

    def __init__(self, d, reduction_factor=2, act=nn.ReLU):
        super().__init__()
        h = d // 2
        r = int(h // reduction_factor)
        self.h = h
        self.F = nn.Sequential(nn.Linear(h, r), act(), nn.Linear(r, h))
        self.G = nn.Sequential(nn.Linear(h, r), act(), nn.Linear(r, h))

    def forward(self, x, rev=False):
        x1, x2 = x[..., : self.h], x[..., self.h :]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


class RefGLOW(nn.Module):
    """adapters.GLOWCouplingBlock (slicing on the last dimension): affine coupling with the scale
    e(s) = exp(clamp * 0.636 * atan(s / clamp)); s2 reads x2 and updates x1, s1 reads y1, updates x2."""

    def __init__(self, d, reduction_factor=2, clamp=5.0, act=nn.ReLU):
        super().__init__()
        h = d // 2
        r = int(h / reduction_factor)
        self.h, self.clamp = h, clamp
        self.s1 = nn.Sequential(nn.Linear(h, r), act(), nn.Linear(r, 2 * h))
        self.s2 = nn.Sequential(nn.Linear(h, r), act(), nn.Linear(r, 2 * h))

    def e(self, s):
        return torch.exp(self.clamp * 0.636 * torch.atan(s / self.clamp))

    def forward(self, x, rev=False):
        h = self.h
        x1, x2 = x[..., :h], x[..., h:]
        if not rev:
            r2 = self.s2(x2)
            s2, t2 = r2[..., :h], r2[..., h:]
            y1 = self.e(s2) * x1 + t2
            r1 = self.s1(y1)
            s1, t1 = r1[..., :h], r1[..., h:]
            y2 = self.e(s1) * x2 + t1
        else:
            r1 = self.s1(x1)
            s1, t1 = r1[..., :h], r1[..., h:]
            y2 = (x2 - t1) / self.e(s1)
            r2 = self.s2(y2)
            s2, t2 = r2[..., :h], r2[..., h:]
            y1 = (x1 - t2) / self.e(s2)
        return torch.cat((y1, y2), -1)


def make_pair(kind, d=16, n=1, seed=0):
    """A fastpeft bank of n and n reference blocks holding the same (random, non-trivial) weights."""
    torch.manual_seed(seed)
    fused = InvertibleAdapter(d, reduction_factor=2, kind=kind, num_adapters=n)
    refs = nn.ModuleList([(RefNICE if kind == "nice" else RefGLOW)(d) for _ in range(n)])
    for i, ref in enumerate(refs):
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.4)
        f, g = (ref.F, ref.G) if kind == "nice" else (ref.s2, ref.s1)
        fused.load_adapter(i, f, g)
    return fused, refs


def ref_apply(refs, x, ids, rev):
    if ids is None:
        return refs[0](x, rev=rev)
    return torch.cat([refs[int(i)](x[b : b + 1], rev=rev) for b, i in enumerate(ids)])


# ---- invertibility ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", [(4, 5), (4,), (2, 3, 2)])
def test_inverse_of_forward_is_identity(kind, n, shape):
    fused, _ = make_pair(kind, n=n)
    x = torch.randn(*shape, 16) * 2
    ids = torch.tensor([0, 2, 1, 2][: shape[0]]) % n if n > 1 else None
    y = fused(x, ids)
    assert (y - x).abs().max() > 0.1  # the coupling does change x
    # NICE adds and subtracts the same values: fp32 tolerance. GLOW multiplies by scales up to
    # e^clamp and divides back, which amplifies rounding: 10x the fp32 tolerance.
    scale = 1 if kind == "nice" else 10
    assert_close(fused.inverse(y, ids), x, scale=scale)
    assert_close(fused(fused.inverse(x, ids), ids), x, scale=scale)


def test_bank_entries_differ_and_wrong_ids_do_not_invert():
    fused, _ = make_pair("nice", n=2)
    x = torch.randn(2, 3, 16)
    y = fused(x, torch.tensor([0, 1]))
    assert not torch.allclose(y[1], fused(x, torch.tensor([0, 0]))[1], atol=1e-3)
    assert not torch.allclose(fused.inverse(y, torch.tensor([1, 0])), x, atol=1e-3)


# ---- parity with the plain-PyTorch reference: outputs and gradients ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("rev", [False, True])
def test_matches_reference_outputs_and_gradients(kind, n, rev):
    fused, refs = make_pair(kind, n=n)
    x = torch.randn(4, 5, 16)
    ids = torch.tensor([2, 0, 2, 1]) if n > 1 else None
    x1, x2 = leaf(x), leaf(x)
    y = fused.inverse(x1, ids) if rev else fused(x1, ids)
    y_ref = ref_apply(refs, x2, ids, rev)
    assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x1.grad, x2.grad, scale=10)
    for i, ref in enumerate(refs):
        f, g = (ref.F, ref.G) if kind == "nice" else (ref.s2, ref.s1)
        for net, seq in (("f", f), ("g", g)):
            for part, lin in zip(("down", "up"), (seq[0], seq[2])):
                assert_close(getattr(fused, f"{net}_{part}_weight").grad[i], lin.weight.grad, scale=10)
                assert_close(getattr(fused, f"{net}_{part}_bias").grad[i], lin.bias.grad, scale=10)


def test_glow_scale_is_clamped():
    """Huge log-scales are soft-clamped: with the shifts zeroed, y1 / x1 stays within e^(+-clamp)."""
    fused, _ = make_pair("glow", n=1)
    with torch.no_grad():
        fused.f_up_weight.mul_(1e4)
        fused.f_up_weight[:, 8:].zero_()  # the shift half of f's output
        fused.f_up_bias[:, 8:].zero_()
    x = torch.randn(64, 16)
    ratio = fused(x)[:, :8] / x[:, :8]
    assert ratio.max() <= torch.exp(torch.tensor(fused.clamp)) and ratio.min() >= torch.exp(torch.tensor(-fused.clamp))
    assert ratio.max() > 10  # the scale is far from 1: the clamp is what bounds it


def test_empty_batch_and_autocast_dtype():
    fused, _ = make_pair("nice", n=2)
    assert fused(torch.randn(0, 3, 16), torch.zeros(0, dtype=torch.long)).shape == (0, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(torch.randn(2, 16), torch.tensor([0, 1])).dtype == torch.bfloat16


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    (dict(hidden=15), "hidden must be even"),
    (dict(hidden=0), "hidden"),
    (dict(hidden=16, reduction_factor=0), "reduction_factor"),
    (dict(hidden=16, reduction_factor=-2), "reduction_factor"),
    (dict(hidden=16, reduction_factor=16), "reduction_factor"),
    (dict(hidden=16, kind="affine"), "kind"),
    (dict(hidden=16, num_adapters=0), "num_adapters"),
    (dict(hidden=16, non_linearity="softmax"), "non_linearity"),
    (dict(hidden=16, kind="glow", clamp=0), "clamp"),
])  # fmt: skip
def test_bad_construction_raises_naming_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        InvertibleAdapter(**kwargs)


@pytest.mark.parametrize("ids, word", [
    (None, "adapter_ids is required"),
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([[0, 1]]), "1-D"),
    (torch.tensor([0, 1, 1]), "entries for a batch of 2"),
    (torch.tensor([0, 3]), r"in \[0, 3\)"),
    (torch.tensor([-1, 0]), r"in \[0, 3\)"),
])  # fmt: skip
def test_bad_adapter_ids_raise(ids, word):
    fused, _ = make_pair("nice", n=3)
    for fn in (fused, fused.inverse):
        with pytest.raises(ValueError, match=word):
            fn(torch.randn(2, 4, 16), ids)


def test_bad_input_shape_raises():
    fused, _ = make_pair("nice")
    with pytest.raises(ValueError, match="x has last dimension 12"):
        fused(torch.randn(2, 12))
    with pytest.raises(ValueError, match="y must be a tensor"):
        fused.inverse(torch.randn(16))
