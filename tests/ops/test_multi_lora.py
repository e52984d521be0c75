"""Multi-LoRA op against its plain-PyTorch reference: mixed ranks, routing, dtypes, 4-bit, memory, errors."""

import pytest
import torch

from fastpeft.ops import (
    lora_linear,
    multi_lora_linear,
    multi_lora_linear_reference,
    plan_multi_lora,
)
from fastpeft.ops.frozen_weight import dense_weight_reference
from fastpeft.quant import frozen_weight_args
from tests.utils import (DTYPES, assert_all_close, assert_close, assert_error_within, devices, leaf, make_weight,
                         saved_tensor_bytes)  # fmt: skip

BF = pytest.importorskip("bitsandbytes.functional")

# (leading shape of x, in_features, out_features, ranks, index per "example" or "token")
CASES = [
    ((6,), 123, 77, [1, 16, 256], "token"),  # odd sizes, extreme ranks mixed
    ((3, 5), 64, 96, [8, 8, 4, 32], "example"),  # index per example of a [batch, seq, in] input
    ((40,), 128, 64, [2], "one"),  # every row on one adapter
    ((7,), 40, 24, [3, 5], "base"),  # every row on no adapter (-1)
    ((0,), 32, 48, [4, 8], "token"),  # empty batch
]


def make_bank(ranks, in_f, out_f, dtype, device):
    As = [leaf(torch.randn(r, in_f, dtype=dtype, device=device) / in_f**0.5) for r in ranks]
    Bs = [leaf(torch.randn(out_f, r, dtype=dtype, device=device) / r**0.5) for r in ranks]
    return As, Bs


def make_index(mode, lead, n, device):
    if mode == "one":
        return torch.zeros(lead[:1], dtype=torch.int64, device=device)
    if mode == "base":
        return torch.full(lead[:1], -1, dtype=torch.int64, device=device)
    shape = lead[:1] if mode == "example" else lead
    return torch.randint(-1, n, shape, device=device)


def run(fn, x, weight, bias, As, Bs, scalings, index, p=0.0, seed=None, grad=None):
    """Output and gradients of x, every A, every B (and the bias); zeros for unused inputs."""
    leaves = [x, *As, *Bs] + ([bias] if bias is not None else [])
    y = fn(x, weight, bias, As, Bs, scalings, index, p, seed)
    grads = torch.autograd.grad(y, leaves, grad, allow_unused=True, materialize_grads=True)
    return y, grads


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_matches_reference(device, dtype, case, kind, dropout):
    lead, in_f, out_f, ranks, mode = case
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    weight = make_weight(kind, out_f, in_f, dtype, device)
    bias = leaf(torch.randn(out_f, dtype=dtype, device=device))
    As, Bs = make_bank(ranks, in_f, out_f, dtype, device)
    scalings = [0.5 + i for i in range(len(ranks))]
    index = make_index(mode, lead, len(ranks), device)
    p = [dropout * (i % 2 == 0) for i in range(len(ranks))]  # per-adapter dropout, some off
    seed = torch.tensor([321])
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)

    y, grads = run(multi_lora_linear, x, weight, bias, As, Bs, scalings, index, p, seed, g)
    y_ref, grads_ref = run(multi_lora_linear_reference, x, weight, bias, As, Bs, scalings, index, p, seed, g)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    dense_w = dense_weight_reference(weight, dtype)
    up = lambda ts: [leaf(t.detach().float()) for t in ts]  # noqa: E731
    x32, (b32,), As32, Bs32 = up([x])[0], up([bias]), up(As), up(Bs)
    y32, grads32 = run(multi_lora_linear_reference, x32, dense_w.float(), b32, As32, Bs32, scalings, index, p, seed,
                       g.float())  # fmt: skip
    assert_error_within(y, y_ref, y32)
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got, ref, ref32)


def _check_against_reference(y, grads, x, weight, bias, As, Bs, scalings, index, p, seed, g):
    dtype = x.dtype
    y_ref, grads_ref = run(multi_lora_linear_reference, x, weight, bias, As, Bs, scalings, index, p, seed, g)
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    up = lambda ts: [leaf(t.detach().float()) for t in ts]  # noqa: E731
    x32, (b32,), As32, Bs32 = up([x])[0], up([bias]), up(As), up(Bs)
    w32 = dense_weight_reference(weight, dtype).float()
    y32, grads32 = run(multi_lora_linear_reference, x32, w32, b32, As32, Bs32, scalings, index, p, seed, g.float())
    assert_error_within(y, y_ref, y32)
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got, ref, ref32)


# Each path of the op, forced (FASTPEFT_MULTI_LORA_PATH), against the reference. The grouped path
# runs on the CPU too (ATen's _grouped_mm loops over the groups there), so its layout, gathers and
# scatters are tested on every machine; bgmv is a CUDA forward (its backward is the segment path).
PATHS = ["grouped", pytest.param("bgmv", marks=pytest.mark.cuda), "segment"]
# (lead, in, out, ranks, index): aligned rows (the grouped GEMM needs 16-byte rows), mixed ranks
# (padded to 8 when stacked), rows with no adapter, an adapter no row uses, segments of 1..40 rows.
PATH_CASES = [
    ((6, 7), 64, 40, [8, 16, 3], torch.tensor([2, 0, -1, 2, 0, 2])),  # adapter 1 unused
    ((45,), 128, 96, [16, 16], None),  # uniform ranks: the bank is one stack
    ((3,), 32, 16, [4, 64, 1], torch.tensor([1, 1, 2])),  # decode-like: a row or two per adapter
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(PATH_CASES)))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_each_path_matches_reference(device, dtype, path, case, dropout, monkeypatch):
    if path == "bgmv" and device == "cpu":
        pytest.skip("bgmv is a CUDA kernel")
    monkeypatch.setenv("FASTPEFT_MULTI_LORA_PATH", path)
    lead, in_f, out_f, ranks, index = PATH_CASES[case]
    torch.manual_seed(case)
    index = torch.randint(-1, len(ranks), lead[:1]) if index is None else index
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    weight = make_weight("dense", out_f, in_f, dtype, device)
    bias = leaf(torch.randn(out_f, dtype=dtype, device=device))
    As, Bs = make_bank(ranks, in_f, out_f, dtype, device)
    scalings = [0.5 + i for i in range(len(ranks))]
    p = [dropout * (i % 2 == 0) for i in range(len(ranks))]
    seed = torch.tensor([7])
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, grads = run(multi_lora_linear, x, weight, bias, As, Bs, scalings, index.to(device), p, seed, g)
    grouped_gemms = sum(e.count for e in prof.key_averages() if e.key == "aten::_grouped_mm")
    assert grouped_gemms == (6 if path == "grouped" else 0)  # 2 forward, 4 backward: the path really ran
    _check_against_reference(y, grads, x, weight, bias, As, Bs, scalings, index.to(device), p, seed, g)
    if case == 0:  # the unused adapter's gradients are zeros, not whatever the GEMM left there
        assert torch.count_nonzero(grads[2]) == 0 and torch.count_nonzero(grads[5]) == 0


def test_grouped_path_refuses_unaligned_rows_and_bad_path_names(monkeypatch):
    x = torch.randn(4, 30)
    As, Bs = make_bank([4], 30, 16, torch.float32, "cpu")
    W = torch.randn(16, 30)
    monkeypatch.setenv("FASTPEFT_MULTI_LORA_PATH", "grouped")
    with pytest.raises(RuntimeError, match=r"grouped needs in_features \(30\) and out_features \(16\) to be"):
        multi_lora_linear(x, W, None, As, Bs, [1.0], torch.zeros(4, dtype=torch.int64))
    monkeypatch.setenv("FASTPEFT_MULTI_LORA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="FASTPEFT_MULTI_LORA_PATH must be auto, segment, grouped or bgmv"):
        multi_lora_linear(x, W, None, As, Bs, [1.0], torch.zeros(4, dtype=torch.int64))
    monkeypatch.setenv("FASTPEFT_MULTI_LORA_PATH", "bgmv")
    with pytest.raises(RuntimeError, match="bgmv is a CUDA kernel"):
        multi_lora_linear(x, W, None, As, Bs, [1.0], torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
def test_mixed_batch_equals_each_example_alone(device, kind):
    # A batch where every example names its adapter gives the outputs and the
    # gradients of running each example alone with its adapter (gradients summed over examples).
    batch, seq, in_f, out_f, ranks = 9, 5, 96, 80, [1, 3, 64, 256, 17]
    x = leaf(torch.randn(batch, seq, in_f, device=device))
    weight = make_weight(kind, out_f, in_f, torch.float32, device)
    bias = leaf(torch.randn(out_f, device=device))
    As, Bs = make_bank(ranks, in_f, out_f, torch.float32, device)
    scalings = [2.0, 0.5, 1.0, 0.25, 1.5]
    index = torch.tensor([2, 0, -1, 4, 2, 1, 3, 0, 2], device=device)
    g = torch.randn(batch, seq, out_f, device=device)
    y, grads = run(multi_lora_linear, x, weight, bias, As, Bs, scalings, index, grad=g)

    alone_y, alone_grads = [], None
    for b in range(batch):
        yb, gb = run(multi_lora_linear, x[b : b + 1], weight, bias, As, Bs, scalings, index[b : b + 1], grad=g[b : b + 1])
        alone_y.append(yb)
        gb = list(gb)
        gb[0] = torch.autograd.grad(x[b : b + 1], x, gb[0])[0]  # place example b's x-gradient in the batch
        alone_grads = gb if alone_grads is None else [s + t for s, t in zip(alone_grads, gb)]
    assert_close(y, torch.cat(alone_y), scale=10)
    for got, ref in zip(grads, alone_grads):
        assert_close(got, ref, scale=10)
    # and it is not trivially so: an adapter's output differs from the base layer's
    base = multi_lora_linear(x, weight, bias, As, Bs, scalings, torch.full_like(index, -1))
    assert (y - base).abs().amax(dim=(1, 2)).gt(1e-3).tolist() == [i != -1 for i in index.tolist()]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_adapter_with_dropout_equals_lora_linear(device, dtype):
    # The multi-adapter op on rows that all use adapter 1 is the single-adapter op, dropout mask
    # included (both hash the element index of the whole [M, in] input).
    x = leaf(torch.randn(2, 33, 72, dtype=dtype, device=device))
    W = torch.randn(40, 72, dtype=dtype, device=device) / 72**0.5
    As, Bs = make_bank([4, 8], 72, 40, dtype, device)
    seed = torch.tensor([99])
    index = torch.ones(2, dtype=torch.int64, device=device)
    g = torch.randn(2, 33, 40, dtype=dtype, device=device)
    y, grads = run(multi_lora_linear, x, W, None, As, Bs, [1.0, 0.75], index, [0.0, 0.3], seed, g)
    y1 = lora_linear(x, W, None, As[1], Bs[1], 0.75, 0.3, seed)
    gx1, gA1, gB1 = torch.autograd.grad(y1, [x, As[1], Bs[1]], g)
    # Rounding differs in low precision (the ops sum in different orders); a different mask would
    # differ by whole elements of x.
    assert_close(y, y1, scale=10)
    for got, ref in [(grads[0], gx1), (grads[2], gA1), (grads[4], gB1)]:
        assert_close(got, ref, scale=10)
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[3]) == 0  # unused adapter


@pytest.mark.parametrize("device", devices())
def test_plan_groups_rows_and_is_reusable(device):
    index = torch.tensor([[2, 0], [-1, 2], [0, 0]], device=device)  # per token of x [3, 2, in]
    plan = plan_multi_lora(index, rows=6, num_adapters=3)
    assert plan.sorted_rows.dtype == torch.int32 and plan.offsets.shape == (3, 4)
    assert plan.sorted_rows.tolist() == [1, 4, 5, 0, 3, 2]  # adapter 0, (1: none), 2, then no adapter
    assert plan.offsets[0].tolist() == [0, 3, 3, 5]
    assert plan.offsets[1].tolist() == [0, 1, 1, 2]  # 64-row tiles before each adapter
    assert plan.offsets[2].tolist() == [0, 8, 8, 16]  # grouped layout: segments padded to 8 rows
    # One plan serves every layer of the batch; a per-example index plans like its expansion.
    x = torch.randn(3, 2, 16, device=device)
    As, Bs = make_bank([2, 3, 4], 16, 8, torch.float32, device)
    W = torch.randn(8, 16, device=device)
    y_plan = multi_lora_linear(x, W, None, As, Bs, [1.0] * 3, plan)
    y_index = multi_lora_linear(x, W, None, As, Bs, [1.0] * 3, index)
    assert torch.equal(y_plan, y_index)
    per_example = torch.tensor([1, -1, 2], device=device)
    expanded = per_example[:, None].expand(3, 2)
    assert torch.equal(
        multi_lora_linear(x, W, None, As, Bs, [1.0] * 3, per_example),
        multi_lora_linear(x, W, None, As, Bs, [1.0] * 3, expanded),
    )


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input_and_adapters(device):
    base = torch.randn(40, 3, 5, device=device)
    x = leaf(base).permute(1, 2, 0)  # [3, 5, 40], non-contiguous
    assert not x.is_contiguous()
    W = torch.randn(24, 40, device=device)
    A0 = leaf(torch.randn(40, 6, device=device)).t()  # [6, 40], non-contiguous
    As = [A0, leaf(torch.randn(2, 40, device=device))]
    Bs = [leaf(torch.randn(24, 6, device=device)), leaf(torch.randn(24, 2, device=device))]
    index = torch.tensor([1, 0, 1], device=device)
    y = multi_lora_linear(x, W, None, As, Bs, [0.5, 2.0], index)
    y_ref = multi_lora_linear_reference(x.contiguous(), W, None, As, Bs, [0.5, 2.0], index)
    assert_close(y, y_ref, scale=10)
    g = torch.randn_like(y)
    gx, gA0 = torch.autograd.grad(y, [x, A0], g)
    gx_ref, gA0_ref = torch.autograd.grad(y_ref, [x, A0], g)
    assert gx.shape == x.shape and gA0.shape == A0.shape
    assert_close(gx, gx_ref, scale=10)
    assert_close(gA0, gA0_ref, scale=10)


def test_frozen_adapters_get_no_gradient_and_unused_ones_get_zeros():
    x = torch.randn(12, 32)
    W = torch.randn(16, 32)
    As, Bs = make_bank([4, 2, 8], 32, 16, torch.float32, "cpu")
    As[1].requires_grad_(False)
    Bs[1].requires_grad_(False)
    index = torch.tensor([0, 1, 1, 0, -1, 1, 0, 0, 1, 1, -1, 0])  # adapter 2 unused
    y = multi_lora_linear(x, W, None, As, Bs, [1.0, 1.0, 1.0], index)
    y.sum().backward()
    assert As[1].grad is None and Bs[1].grad is None
    assert torch.count_nonzero(As[2].grad) == 0 and torch.count_nonzero(Bs[2].grad) == 0
    As_ref = [leaf(a) for a in As]
    Bs_ref = [leaf(b) for b in Bs]
    multi_lora_linear_reference(x, W, None, As_ref, Bs_ref, [1.0] * 3, index).sum().backward()
    assert_close(As[0].grad, As_ref[0].grad, scale=10)
    assert_close(Bs[0].grad, Bs_ref[0].grad, scale=10)


@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
def test_empty_bank(kind):
    x = leaf(torch.randn(5, 64))
    weight = make_weight(kind, 32, 64, torch.float32, "cpu")
    y = multi_lora_linear(x, weight, None, [], [], [], torch.full((5,), -1))
    y_ref = multi_lora_linear_reference(x, weight, None, [], [], [], torch.full((5,), -1))
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def test_dense_weight_gradient_when_trainable():
    x = leaf(torch.randn(10, 24))
    W = leaf(torch.randn(12, 24))
    As, Bs = make_bank([3, 5], 24, 12, torch.float32, "cpu")
    index = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0, 1])
    y = multi_lora_linear(x, W, None, As, Bs, [1.0, 2.0], index)
    y_ref = multi_lora_linear_reference(x, W, None, As, Bs, [1.0, 2.0], index)
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, W, g)[0], torch.autograd.grad(y_ref, W, g)[0], scale=10)


# ---- memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_for_backward_is_x_shrink_and_plan(kind, dropout):
    M, in_f, out_f, ranks = 200, 128, 96, [4, 16, 8]
    x = leaf(torch.randn(M, in_f))
    weight = make_weight(kind, out_f, in_f, torch.float32, "cpu")
    As, Bs = make_bank(ranks, in_f, out_f, torch.float32, "cpu")
    index = torch.randint(-1, 3, (M,))
    frozen = [*As, *Bs] + ([weight] if kind == "dense" else [getattr(weight, f.name) for f in fields(weight)])
    saved, shapes, y = saved_tensor_bytes(
        lambda: multi_lora_linear(x, weight, None, As, Bs, [1.0] * 3, index, dropout, torch.tensor([5])), exclude=frozen
    )
    plan_bytes = M * 4 + 3 * (len(ranks) + 1) * 4
    seed_bytes = 8 if dropout else 0
    # x, the [M, max rank] shrink, the int32 plan, the dropout seed: nothing of size M x out, no weight
    assert saved == x.numel() * 4 + M * max(ranks) * 4 + plan_bytes + seed_bytes, shapes
    assert (out_f, in_f) not in shapes and (M, out_f) not in shapes
    y.sum().backward()


def fields(weight):
    import dataclasses

    return [f for f in dataclasses.fields(weight) if isinstance(getattr(weight, f.name), torch.Tensor)]


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_multi_lora_linear(device, requires_grad, dropout):
    opts = dict(device=device, requires_grad=requires_grad)
    x = torch.randn(2, 5, 32, **opts)
    W = torch.randn(16, 32, device=device)
    As = [torch.randn(4, 32, **opts), torch.randn(1, 32, **opts), torch.randn(7, 32, **opts)]
    Bs = [torch.randn(16, 4, **opts), torch.randn(16, 1, **opts), torch.randn(16, 7, **opts)]
    b = torch.randn(16, **opts)
    plan = plan_multi_lora(torch.tensor([2, 0], device=device), 10, 3)
    seed = torch.tensor([1]) if dropout else None
    args = (x, "dense", [W], [], b, As, Bs, [1.0, 0.5, 2.0], [dropout, 0.0, dropout], seed, plan.sorted_rows, plan.offsets)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_linear, args)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_plan, (torch.tensor([2, -1, 0], device=device), 6, 3))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_opcheck_multi_lora_linear_quantized(device, requires_grad, kind):
    opts = dict(device=device, requires_grad=requires_grad)
    qw = make_weight(kind, 16, 64, torch.float32, device)
    x = torch.randn(6, 64, **opts)
    As = [torch.randn(4, 64, **opts), torch.randn(2, 64, **opts)]
    Bs = [torch.randn(16, 4, **opts), torch.randn(16, 2, **opts)]
    plan = plan_multi_lora(torch.tensor([1, 0, -1, 1, 1, 0], device=device), 6, 2)
    args = (x, *frozen_weight_args([qw]), torch.randn(16, **opts), As, Bs, [1.5, 1.0], [0.2, 0.0], torch.tensor([4]),
            plan.sorted_rows, plan.offsets)  # fmt: skip
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_linear, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward(device):
    x = torch.randn(6, 32, device=device)
    W = torch.randn(16, 32, device=device)
    As = [torch.randn(4, 32, device=device), torch.randn(2, 32, device=device)]
    Bs = [torch.randn(16, 4, device=device), torch.randn(16, 2, device=device)]
    plan = plan_multi_lora(torch.tensor([1, 0, -1, 1, 1, 0], device=device), 6, 2)
    seed = torch.tensor([1])
    fwd = (x, "dense", [W], [], None, As, Bs, [1.0, 2.0], [0.1, 0.0], seed, plan.sorted_rows, plan.offsets)
    out, shrink = torch.ops.fastpeft.multi_lora_linear(*fwd)
    g = torch.randn_like(out)
    rest = (As, Bs, [1.0, 2.0], [0.1, 0.0], seed, plan.sorted_rows, plan.offsets)
    ops = torch.ops.fastpeft
    dense = ("dense", [W], [])
    torch.library.opcheck(ops.multi_lora_linear_backward, (g, x, shrink, *dense, *rest, [True, True, True], [True, True]))
    torch.library.opcheck(ops.multi_lora_linear_backward, (g, x, shrink, *dense, *rest, [False, False, False], [False, True]))
    int8 = frozen_weight_args([make_weight("int8", 16, 32, torch.float32, device)])
    torch.library.opcheck(ops.multi_lora_linear_backward, (g, x, shrink, *int8, *rest, [True, False, True], [True, False]))


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    x, W = torch.randn(4, 32), torch.randn(16, 32)
    As, Bs = [torch.randn(4, 32), torch.randn(2, 32)], [torch.randn(16, 4), torch.randn(16, 2)]
    index = torch.tensor([0, 1, -1, 1])
    base = dict(x=x, weight=W, bias=None, lora_A=As, lora_B=Bs, scalings=[1.0, 1.0], adapter_index=index)
    cases = [
        (dict(adapter_index=torch.tensor([0, 2, 1, 1])), RuntimeError,
         r"adapter_index holds 2 but 2 adapters are loaded; valid indices are 0\.\.1, or -1"),
        (dict(adapter_index=torch.tensor([0, -2, 1, 1])), RuntimeError, r"adapter_index holds -2"),
        (dict(lora_B=[Bs[0], torch.randn(16, 3)]), RuntimeError, r"lora_B\[1\] must be \[16, 2\] \(out_features x the rank of lora_A\[1\]\)"),
        (dict(lora_A=[As[0], torch.randn(2, 31)]), RuntimeError, r"lora_A\[1\] must be \[r, 32\]"),
        (dict(lora_A=[As[0].half(), As[1]]), RuntimeError, r"lora_A\[0\] must be Float \(the dtype of x"),
        (dict(lora_B=[Bs[0]]), ValueError, r"lora_A and lora_B must have one entry per adapter"),
        (dict(scalings=[1.0]), ValueError, r"scalings must have one entry per adapter \(2\)"),
        (dict(adapter_index=torch.tensor([0, 1])), ValueError, r"adapter_index has shape \(2,\)"),
        (dict(adapter_index=torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError, r"adapter_index must be an int32 or int64"),
        (dict(weight=W.double()), RuntimeError, r"weight must be Float"),
        (dict(bias=torch.randn(15)), RuntimeError, r"bias must be \[16\]"),
        (dict(x=x.long()), RuntimeError, r"x must be float32, float16 or bfloat16"),
        (dict(dropout_p=[0.0, 1.0]), ValueError, r"dropout_p\[1\] must be in \[0, 1\)"),
    ]  # fmt: skip
    for change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            multi_lora_linear(**{**base, **change})
    plan = plan_multi_lora(index, 4, 2)
    with pytest.raises(ValueError, match="the plan was made for 4 rows and 2 adapters, but x has 5 rows"):
        multi_lora_linear(torch.randn(5, 32), W, None, As, Bs, [1.0, 1.0], plan)
    ops = torch.ops.fastpeft
    with pytest.raises(RuntimeError, match=r"offsets must be \[3, 2\] for 1 adapters"):
        ops.multi_lora_linear(x, "dense", [W], [], None, As[:1], Bs[:1], [1.0], [0.0], None, plan.sorted_rows, plan.offsets)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs a seed"):
        ops.multi_lora_linear(x, "dense", [W], [], None, As, Bs, [1.0, 1.0], [0.5, 0.0], None, plan.sorted_rows, plan.offsets)
    with pytest.raises(RuntimeError, match="adapter_index has 3 entries, which must divide the 4 rows"):
        ops.multi_lora_plan(torch.tensor([0, 1, 0]), 4, 2)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    x, W = torch.randn(4, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    As, Bs = [torch.randn(4, 32)], [torch.randn(16, 4, device="cuda")]
    with pytest.raises(RuntimeError, match=r"lora_A\[0\] is on cpu but x is on cuda"):
        multi_lora_linear(x, W, None, As, Bs, [1.0], torch.zeros(4, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="adapter_index is on cpu but x is on cuda"):
        multi_lora_linear(x, W, None, [As[0].cuda()], Bs, [1.0], torch.zeros(4, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n_adapters", [(64, 64), (3000, 3), (700, 12)])
def test_cuda_segment_kernels_at_scale(dtype, rows, n_adapters):
    # Decode-like (one row per adapter: split-K paths), prefill-like (long segments: split weight
    # gradients) and in between; hidden sizes that are not multiples of the tiles.
    in_f, out_f = 1000, 520
    ranks = [[1, 8, 16, 64, 256, 33][i % 6] for i in range(n_adapters)]
    x = leaf(torch.randn(rows, in_f, dtype=dtype, device="cuda"))
    W = torch.randn(out_f, in_f, dtype=dtype, device="cuda") / in_f**0.5
    As, Bs = make_bank(ranks, in_f, out_f, dtype, "cuda")
    index = torch.randint(-1, n_adapters, (rows,), device="cuda")
    scalings = [1.0 + 0.1 * i for i in range(n_adapters)]
    g = torch.randn(rows, out_f, dtype=dtype, device="cuda")
    y, grads = run(multi_lora_linear, x, W, None, As, Bs, scalings, index, 0.1, torch.tensor([7]), g)
    up = lambda ts: [leaf(t.detach().float()) for t in ts]  # noqa: E731
    y_ref, grads_ref = run(multi_lora_linear_reference, x, W, None, As, Bs, scalings, index, 0.1, torch.tensor([7]), g)
    y32, grads32 = run(multi_lora_linear_reference, up([x])[0], W.float(), None, up(As), up(Bs), scalings, index, 0.1,
                       torch.tensor([7]), g.float())  # fmt: skip
    # float32: the reference is itself float32, so the bound is a floor scaled to the values (sums of
    # up to 3000 terms in a different order).
    floor = lambda ref32: 1e-4 * max(1.0, ref32.abs().max().item()) if dtype == torch.float32 else None  # noqa: E731
    assert_error_within(y, y_ref, y32, floor=floor(y32))
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got, ref, ref32, floor=floor(ref32))


# ---- C++ autograd (csrc/multi_lora/multi_lora_autograd.cpp) ----------------------------------------


@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
def test_gradient_of_each_input_alone(kind):
    """needs_input_grad is honoured per input: each gradient, asked for alone, equals the
    reference's, and no other input gets one."""
    x0 = torch.randn(3, 5, 32)
    weight = make_weight(kind, 24, 32, torch.float32, "cpu")
    As, Bs = make_bank([4, 2, 6], 32, 24, torch.float32, "cpu")
    As, Bs = [a.detach() for a in As], [b.detach() for b in Bs]
    bias = torch.randn(24)
    index = torch.tensor([2, -1, 0])
    names = ["x", "A0", "B2", "A2", "bias"] + (["weight"] if kind == "dense" else [])
    g = torch.randn(3, 5, 24)
    for name in names:
        tensors = {"x": x0, "A0": As[0], "A1": As[1], "A2": As[2], "B0": Bs[0], "B1": Bs[1], "B2": Bs[2], "bias": bias}
        if kind == "dense":
            tensors["weight"] = weight

        def inputs():
            t = {k: v.detach().clone().requires_grad_(k == name) for k, v in tensors.items()}
            w = t.get("weight", weight)
            return t, w

        t, w = inputs()
        y = multi_lora_linear(t["x"], w, t["bias"], [t["A0"], t["A1"], t["A2"]], [t["B0"], t["B1"], t["B2"]],
                              [1.0, 0.5, 2.0], index)  # fmt: skip
        y.backward(g)
        t_ref, w_ref = inputs()
        r = t_ref
        y_ref = multi_lora_linear_reference(r["x"], w_ref, r["bias"], [r["A0"], r["A1"], r["A2"]],
                                            [r["B0"], r["B1"], r["B2"]], [1.0, 0.5, 2.0], index)  # fmt: skip
        y_ref.backward(g)
        assert_close(t[name].grad, t_ref[name].grad, scale=10, msg=name)
        assert all(v.grad is None for k, v in t.items() if k != name), name


@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "int8"])
def test_shrink_output_gets_no_gradient(kind):
    """The op's second output (the shrink saved for backward) is not differentiable: a loss that
    also reads it gives the same gradients as one that reads only the layer output."""
    x = leaf(torch.randn(6, 32))
    weight = make_weight(kind, 16, 32, torch.float32, "cpu")
    As, Bs = make_bank([4, 2], 32, 16, torch.float32, "cpu")
    plan = plan_multi_lora(torch.tensor([1, 0, -1, 1, 1, 0]), 6, 2)
    out, shrink = torch.ops.fastpeft.multi_lora_linear(x, *frozen_weight_args([weight]), None, As, Bs, [1.0, 2.0],
                                                       [0.0, 0.0], None, plan.sorted_rows, plan.offsets)  # fmt: skip
    assert out.requires_grad and not shrink.requires_grad
    g = torch.randn_like(out)
    leaves = [x, *As, *Bs]
    got = torch.autograd.grad((out * g).sum() + shrink.sum(), leaves, retain_graph=True)
    want = torch.autograd.grad(out, leaves, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_autograd_is_the_cpp_kernel():
    """No Python register_autograd remains for the multi-LoRA ops: the graph node is the C++
    function, and the ops have no Python autograd registered."""
    for name in ("multi_lora_linear",):
        dump = torch._C._dispatch_dump(f"fastpeft::{name}").splitlines()
        [line] = [entry for entry in dump if entry.startswith("Autograd[")]
        assert "multi_lora_autograd.cpp" in line and "library.py" not in line, line
    x = leaf(torch.randn(4, 32))
    y = multi_lora_linear(x, torch.randn(16, 32), None, [leaf(torch.randn(2, 32))], [leaf(torch.randn(16, 2))], [1.0],
                          torch.tensor([0, -1, 0, 0]))  # fmt: skip
    assert "MultiLoraLinearFunction" in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_f,out_f", [(0, 16), (16, 0)], ids=["in_features=0", "out_features=0"])
def test_zero_width_layers(device, in_f, out_f):
    """A layer with no input or no output features: no kernel launches a zero-sized grid or
    divides by an empty reduction; outputs and gradients are the reference's (zeros)."""
    x = leaf(torch.randn(6, in_f, device=device))
    weight = leaf(torch.randn(out_f, in_f, device=device)).requires_grad_(False)
    As, Bs = make_bank([2, 4], in_f, out_f, torch.float32, device)
    index = torch.tensor([0, 1, -1, 1, 0, 0], device=device)
    g = torch.randn(6, out_f, device=device)
    y, grads = run(multi_lora_linear, x, weight, None, As, Bs, [0.5, 2.0], index, grad=g)
    y_ref, grads_ref = run(multi_lora_linear_reference, x, weight, None, As, Bs, [0.5, 2.0], index, grad=g)
    assert y.shape == (6, out_f)
    assert_close(y, y_ref)
    for got, ref in zip(grads, grads_ref):
        assert got.shape == ref.shape
        assert_close(got, ref)
