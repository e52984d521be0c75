"""Masked weight gradients (fastpeft.ops.masked_weight_linear, fastpeft.optim.use_masked_weight_grads)
against the dense-masked practice (F.linear, dense gradient times a 0/1 mask): outputs and every
gradient, both weight-gradient paths (sampled product and dense GEMM + gather), autocast, gradient
accumulation with clipping, training with SparseMaskedAdamW, the backward's GEMM count and saved
bytes, the module patch (report, state_dict, deepcopy, removal) and bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.ops import masked_weight_linear, masked_weight_linear_reference
from fastpeft.optim import SparseMaskedAdamW, random_mask, remove_masked_weight_grads, use_masked_weight_grads
from tests.utils import assert_close, devices


def sorted_indices(numel, k, seed, dtype=torch.int32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(dtype=dtype, device=device)


def run(fn, x, w, b, idx, grad_out):
    x = x.detach().requires_grad_(x.requires_grad)
    w = w.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    y = fn(x, w, b, idx)
    y.backward(grad_out)
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,bias,x_grad", [((40,), True, True), ((3, 7), False, True), ((5, 6), True, False)])
@pytest.mark.parametrize("path", ["sampled", "dense"])
def test_matches_the_dense_masked_gradient(device, dtype, lead, bias, x_grad, path, monkeypatch):
    # FASTPEFT_SDDMM_CROSSOVER=0 makes the weight gradient one dense GEMM + gather; 1 the sampled product.
    monkeypatch.setenv("FASTPEFT_SDDMM_CROSSOVER", "0" if path == "dense" else "1")
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 24, 40
    x = torch.randn(*lead, in_f, generator=gen).to(device, dtype).requires_grad_(x_grad)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.1).to(device, dtype)
    b = torch.randn(out_f, generator=gen).to(device, dtype) if bias else None
    g = torch.randn(*lead, out_f, generator=gen).to(device, dtype)
    idx = sorted_indices(out_f * in_f, 37, seed=1, device=device)
    got = run(masked_weight_linear, x, w, b, idx, g)
    ref = run(masked_weight_linear_reference, x.float(), w.float(), None if b is None else b.float(), idx, g.float())
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_close(a.float(), r, dtype=dtype, scale=4, msg=name)
    off = torch.ones(out_f * in_f, dtype=torch.bool, device=device)
    off[idx.long()] = False
    assert torch.count_nonzero(got[2].reshape(-1)[off]) == 0  # exactly zero off the mask


def test_int64_indices_and_a_weight_without_grad():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(5, 8)
    idx = sorted_indices(40, 9, seed=2, dtype=torch.int64)
    y = masked_weight_linear(x, w, None, idx)  # weight frozen: only x gets a gradient
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(6, 5) @ w)
    got = run(masked_weight_linear, x, w, None, idx, torch.ones(6, 5))
    ref = run(masked_weight_linear_reference, x, w, None, idx, torch.ones(6, 5))
    assert_close(got[2], ref[2], scale=4)


def test_autocast_bf16_on_cpu():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 32, generator=gen)
    w = torch.randn(12, 32, generator=gen) * 0.1
    b = torch.randn(12, generator=gen)
    idx = sorted_indices(12 * 32, 20, seed=4)
    g = torch.randn(16, 12, generator=gen)
    outs = []
    for fn in (masked_weight_linear, masked_weight_linear_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run(fn, x.requires_grad_(True), w, b, idx, g.bfloat16()))
    for a, r in zip(*outs):
        assert a.dtype == r.dtype
        assert_close(a.float(), r.float(), dtype=torch.bfloat16, scale=2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.conv = nn.Conv1d(4, 4, 1)  # masked too, but not a linear layer
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + self.conv(h.view(-1, 4, 8)).view_as(h)
        return self.fc2(h)


def net_and_mask(seed=0):
    torch.manual_seed(seed)
    net = Net()
    mask = random_mask(net, keep_ratio=0.1, include=lambda n, p: n.endswith("weight"), seed=seed)
    mask["conv.weight"] = torch.tensor([0, 3, 9], dtype=torch.int32)  # random_mask leaves out non-2-D weights
    mask["fc2.bias"] = None
    return net, mask


def data(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(9, 20, generator=gen), torch.randn(9, 6, generator=gen)


def grads_after(net, mask, steps=2, clip=None):
    """Gradients accumulated over ``steps`` micro-batches, optionally clipped, as the dense-masked
    practice would have them (a hook multiplies every masked weight's gradient by its 0/1 mask)."""
    for name, p in net.named_parameters():
        p.requires_grad_(name in mask)
        p.grad = None
    for step in range(steps):
        x, y = data(step)
        F.mse_loss(net(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], clip)
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def mask_hooks(net, mask, layers):
    """The dense-masked practice on the weights of ``layers``: their gradient times the 0/1 mask."""
    from fastpeft.optim.masks import dense_mask_of

    for name, p in net.named_parameters():
        if name.rpartition(".")[0] in layers and mask.get(name) is not None:
            p.register_hook(lambda g, d=dense_mask_of(mask[name], p.detach()): g * d)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_patched_model_accumulates_and_clips_like_the_dense_masked_practice(clip):
    net, mask = net_and_mask()
    ref = copy.deepcopy(net)
    report = use_masked_weight_grads(net, mask)
    assert report.patched == ["fc1", "fc2"]
    assert report.skipped == {}  # the convolution is not a linear layer: it keeps its dense gradient
    mask_hooks(ref, mask, report.patched)
    got, want = grads_after(net, mask, clip=clip), grads_after(ref, mask, clip=clip)
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], scale=10, msg=name)


def test_training_with_sparse_masked_adamw_matches_the_dense_masked_run():
    net, mask = net_and_mask(seed=1)
    ref = copy.deepcopy(net)
    del mask["conv.weight"]
    mask_hooks(ref, mask, use_masked_weight_grads(net, mask).patched)
    names = list(mask)
    params = dict(net.named_parameters())
    ref_params = dict(ref.named_parameters())
    opt = SparseMaskedAdamW([params[n] for n in names], masks=[mask[n] for n in names], lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([ref_params[n] for n in names], lr=1e-2, weight_decay=0.0)
    for model in (net, ref):
        for name, p in model.named_parameters():
            p.requires_grad_(name in mask)
    for step in range(5):
        for model, o in ((net, opt), (ref, ref_opt)):
            x, y = data(step)
            o.zero_grad()
            F.mse_loss(model(x), y).backward()
            o.step()
    for name in ref_params:
        assert_close(params[name].detach(), ref_params[name].detach(), scale=20, msg=name)


def gemms_in(fn) -> int:
    """How many GEMMs (aten::mm / addmm / bmm, also those called inside fastpeft's C++ ops) ``fn`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm"))


def test_backward_runs_one_gemm_and_saves_what_f_linear_saves(monkeypatch):
    monkeypatch.setenv("FASTPEFT_SDDMM_CROSSOVER", "1")
    x = torch.randn(64, 48, requires_grad=True)
    w = torch.randn(32, 48, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    idx = sorted_indices(32 * 48, 15, seed=5)
    counts, saved = [], []
    for fn in (lambda *a: F.linear(*a[:3]), masked_weight_linear):
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: nbytes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):  # fmt: skip
            y = fn(x, w, b, idx)
        counts.append(gemms_in(lambda: y.sum().backward()))
        saved.append(sum(nbytes))
    assert counts == [2, 1]  # grad_x and grad_weight for F.linear; grad_x only for the masked layer
    assert saved[1] == saved[0]  # x and the weight, as F.linear


def test_patch_keeps_parameters_state_dict_and_survives_deepcopy_and_removal():
    net, mask = net_and_mask()
    keys = list(net.state_dict())
    ids = [id(p) for p in net.parameters()]
    use_masked_weight_grads(net, mask)
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == ids
    twin = copy.deepcopy(net)
    assert twin.fc1.forward.__self__ is twin.fc1  # the copy's forward is bound to the copy
    x, y = data(0)
    for m in (net, twin):
        for name, p in m.named_parameters():
            p.requires_grad_(name in mask)
        F.mse_loss(m(x), y).backward()
    torch.testing.assert_close(twin.fc1.weight.grad, net.fc1.weight.grad)
    # Patching again re-points the layers at the new mask's indices.
    other = random_mask(net, keep_ratio=0.2, include=lambda n, p: n.endswith("weight"), seed=7)
    assert use_masked_weight_grads(net, other).patched == ["fc1", "fc2"]
    assert torch.equal(net.fc1._fastpeft_mask_indices, other["fc1.weight"])
    assert remove_masked_weight_grads(net) == ["fc1", "fc2"]
    assert "forward" not in net.fc1.__dict__ and not hasattr(net.fc1, "_fastpeft_mask_indices")
    net.fc1.weight.grad = None
    F.mse_loss(net(x), y).backward()
    assert torch.count_nonzero(net.fc1.weight.grad) == net.fc1.weight.numel()  # dense again


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linears_that_cannot_take_the_patch_are_reported():
    net, mask = net_and_mask()
    net.fc1.forward = lambda x: nn.Linear.forward(net.fc1, x)  # as accelerate's hooks do
    net.fc2.__class__ = OwnForward
    report = use_masked_weight_grads(net, mask)
    assert report.patched == []
    assert report.skipped == {"fc1": "the layer's forward is already replaced (a hook library or a patch holds it)",
                              "fc2": "OwnForward has its own forward (not nn.Linear's)"}  # fmt: skip


@pytest.mark.parametrize("args,message", [
    (dict(weight=torch.randn(4)), "weight must be a 2-D"),
    (dict(weight=torch.ones(3, 8, dtype=torch.int8)), "floating point"),
    (dict(x=torch.randn(2, 7)), "x has 7 features"),
    (dict(indices=torch.tensor([1.0])), "indices must be a 1-D int32/int64"),
    (dict(indices=torch.tensor([[1]])), "indices must be a 1-D int32/int64"),
])  # fmt: skip
def test_bad_inputs_raise(args, message):
    kw = dict(x=torch.randn(2, 8), weight=torch.randn(3, 8), bias=None, indices=torch.tensor([0, 5]))
    kw.update(args)
    with pytest.raises(ValueError, match=message):
        masked_weight_linear(**kw)
    with pytest.raises(ValueError, match="mask must be a dict"):
        use_masked_weight_grads(nn.Linear(2, 2), [torch.tensor([0])])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    x = torch.randn(5, 3, 16, device=device, requires_grad=requires_grad)
    w = torch.randn(12, 16, device=device, requires_grad=requires_grad)
    b = torch.randn(12, device=device, requires_grad=requires_grad)
    idx = sorted_indices(12 * 16, 10, seed=6, device=device)
    torch.library.opcheck(torch.ops.fastpeft.masked_weight_linear, (x, w, b, idx))
    torch.library.opcheck(torch.ops.fastpeft.masked_weight_linear, (x, w, None, idx.long()))
    g = torch.randn(5, 3, 12, device=device)
    torch.library.opcheck(torch.ops.fastpeft.masked_weight_linear_backward,
                          (g, x.detach(), w.detach(), idx, [True, True, True]))  # fmt: skip
    torch.library.opcheck(torch.ops.fastpeft.masked_weight_linear_backward,
                          (g, x.detach(), w.detach(), idx, [False, True, False]))  # fmt: skip


@pytest.mark.parametrize("shape", [(16,), (0, 16), (2, 0, 16)])
def test_one_row_and_zero_token_inputs(shape):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(6, 16, requires_grad=True)
    idx = sorted_indices(6 * 16, 7, seed=8)
    g = torch.randn(*shape[:-1], 6)
    got = run(masked_weight_linear, x, w, None, idx, g)
    ref = run(masked_weight_linear_reference, x, w, None, idx, g)
    for a, r in zip(got, ref):
        if r is not None:
            assert a.shape == r.shape
            assert_close(a, r, scale=4)


def test_mismatched_dtypes_raise_outside_autocast():
    x = torch.randn(3, 8)
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"weight must be Float \(the dtype of x; cast one, or run under torch.autocast\)"):
        masked_weight_linear(x, w, None, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match=r"bias must be Float \(the dtype of x\), got Double"):
        masked_weight_linear(x, w.float(), torch.randn(4, dtype=torch.float64), torch.tensor([0, 5]))
