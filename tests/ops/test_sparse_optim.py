"""Sparse-masked AdamW step op against its plain-PyTorch reference: dtypes, index dtypes, dense
(None) masks, odd and empty sizes, non-contiguous gradients, AMP scale / found_inf, opcheck and
bad input."""

import pytest
import torch

from fastpeft.ops import sparse_adamw_step, sparse_adamw_step_reference
from tests.utils import DTYPES, assert_close, devices

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def make_problem(shapes, dtype, device, density=0.3, index_dtype=torch.int32, seed=0):
    """params, grads, masks (None for shapes marked dense), zero moments and steps at 0."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, masks = [], [], []
    for shape, dense in shapes:
        p = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        g = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        n = p.numel()
        if dense:
            idx = None
        else:
            k = max(0, int(n * density))
            idx = torch.randperm(n, generator=gen)[:k].sort().values.to(dtype=index_dtype, device=device)
        params.append(p)
        grads.append(g)
        masks.append(idx)
    counts = [p.numel() if m is None else m.numel() for p, m in zip(params, masks)]
    exp_avgs = [torch.zeros(c, device=device) for c in counts]
    exp_avg_sqs = [torch.zeros(c, device=device) for c in counts]
    steps = [torch.zeros((), device=device) for _ in params]
    return params, grads, masks, exp_avgs, exp_avg_sqs, steps


def clone_all(problem):
    return [[None if t is None else t.clone() for t in lst] for lst in problem]


def run_steps(fn, problem, n_steps, grad_seed=1, **overrides):
    params, grads, masks, exp_avgs, exp_avg_sqs, steps = problem
    gen = torch.Generator().manual_seed(grad_seed)
    hyper = {**HYPER, **overrides}
    for _ in range(n_steps):
        for g in grads:
            g.copy_(torch.randn(g.shape, generator=gen).to(g.dtype))
        for s in steps:
            s += 1
        fn(params, grads, masks, exp_avgs, exp_avg_sqs, steps, **hyper)


SHAPES = [
    [((37, 53), False), ((129,), True), ((7, 3, 5), False)],  # odd sizes, a dense bias
    [((1,), False), ((4097,), False)],  # a single element; more than one chunk
    [((0,), True), ((16, 16), False)],  # an empty parameter
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_step_matches_reference(device, dtype, shapes, index_dtype):
    problem = make_problem(shapes, dtype, device, index_dtype=index_dtype)
    expected = clone_all(problem)
    originals = [p.clone() for p in problem[0]]
    run_steps(sparse_adamw_step, problem, 5)
    run_steps(sparse_adamw_step_reference, expected, 5)
    for got, ref in zip(problem[0], expected[0]):
        assert_close(got, ref, scale=10)  # parameters (same rounding point: once per step)
    for got, ref in zip(problem[3] + problem[4], expected[3] + expected[4]):
        assert_close(got, ref, dtype=torch.float32, scale=10)  # float32 moments
    # Untrained entries are bit-identical although weight_decay > 0.
    for p, p0, idx in zip(problem[0], originals, problem[2]):
        if idx is None:
            continue
        untouched = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
        untouched[idx.long()] = False
        assert torch.equal(p.view(-1)[untouched], p0.view(-1)[untouched])
        if idx.numel():
            assert not torch.equal(p.view(-1)[idx.long()], p0.view(-1)[idx.long()])


@pytest.mark.parametrize("device", devices())
def test_mixed_dtypes_in_one_call(device):
    a = make_problem([((33, 7), False)], torch.float32, device, seed=1)
    b = make_problem([((65,), False)], torch.bfloat16, device, seed=2)
    both = [x + y for x, y in zip(a, b)]
    expected = clone_all(both)
    run_steps(sparse_adamw_step, both, 3)
    run_steps(sparse_adamw_step_reference, expected, 3)
    for got, ref in zip(both[0], expected[0]):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_grad_and_indices(device):
    problem = make_problem([((24, 40), False)], torch.float32, device)
    expected = clone_all(problem)
    g = torch.randn(40, 24, device=device).t()  # non-contiguous, same values for both
    idx = problem[2][0]
    idx_strided = torch.stack([idx, idx], 1)[:, 0]
    assert not g.is_contiguous() and not idx_strided.is_contiguous()
    p, _, _, m, v, s = problem
    s[0] += 1
    sparse_adamw_step(p, [g], [idx_strided], m, v, s, **HYPER)
    pe, _, ie, me, ve, se = expected
    se[0] += 1
    sparse_adamw_step_reference(pe, [g.contiguous()], ie, me, ve, se, **HYPER)
    assert_close(p[0], pe[0])


@pytest.mark.parametrize("device", devices())
def test_grad_scale_divides_and_found_inf_skips(device):
    problem = make_problem([((50,), False), ((9,), True)], torch.float32, device)
    scaled = clone_all(problem)
    scale = torch.tensor([1024.0], device=device)
    for g, gs in zip(problem[1], scaled[1]):
        gs.copy_(g * 1024)
    for s in problem[5] + scaled[5]:
        s += 1
    sparse_adamw_step(*problem, **HYPER)
    sparse_adamw_step(*scaled, **HYPER, grad_scale=scale, found_inf=torch.zeros(1, device=device))
    for got, ref in zip(scaled[0], problem[0]):
        assert torch.equal(got, ref)  # power-of-two scale: dividing is exact
    before = clone_all(scaled)
    sparse_adamw_step(*scaled, **HYPER, grad_scale=scale, found_inf=torch.ones(1, device=device))
    for got, ref in zip(scaled[0] + scaled[3] + scaled[4], before[0] + before[3] + before[4]):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("device", devices())
def test_out_of_range_index_is_skipped_not_written(device):
    # The op trusts masks validated upstream, but must never write outside the parameter.
    p = torch.zeros(10, device=device)
    guard = torch.zeros(20, device=device)
    p = guard[:10]
    idx = torch.tensor([2, 15], dtype=torch.int32, device=device)
    sparse_adamw_step([p], [torch.ones(10, device=device)], [idx], [torch.zeros(2, device=device)],
                      [torch.zeros(2, device=device)], [torch.ones((), device=device)], **HYPER)  # fmt: skip
    assert guard[2] != 0
    assert torch.count_nonzero(guard) == 1


@pytest.mark.parametrize("device", devices())
def test_empty_list_is_a_no_op(device):
    sparse_adamw_step([], [], [], [], [], [], **HYPER)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("amp", [False, True])
def test_opcheck(device, amp):
    params, grads, masks, m, v, s = make_problem([((12, 5), False), ((7,), True)], torch.float32, device)
    for t in s:
        t += 1
    extra = (torch.ones(1, device=device), torch.zeros(1, device=device)) if amp else (None, None)
    args = (params, grads, masks, m, v, s, 1e-3, 0.9, 0.999, 1e-8, 0.01, *extra)
    torch.library.opcheck(torch.ops.fastpeft.sparse_adamw_step_, args)


def test_bad_input_errors_name_the_argument():
    params, grads, masks, m, v, s = make_problem([((8, 4), False)], torch.float32, "cpu")
    op = torch.ops.fastpeft.sparse_adamw_step_
    h = (1e-3, 0.9, 0.999, 1e-8, 0.0)

    def call(**change):
        args = dict(params=params, grads=grads, indices=masks, exp_avgs=m, exp_avg_sqs=v, steps=s)
        args.update(change)
        op(args["params"], args["grads"], args["indices"], args["exp_avgs"], args["exp_avg_sqs"], args["steps"], *h)

    k = masks[0].numel()
    cases = [
        (dict(grads=[grads[0].double()]), r"grads\[0\] must be Float"),
        (dict(grads=[torch.randn(4, 8)]), r"grads\[0\] must have its parameter's shape"),
        (dict(indices=[masks[0].float()]), r"indices\[0\] must be int32 or int64"),
        (dict(indices=[masks[0].view(1, -1)]), r"indices\[0\] must be 1-D"),
        (dict(exp_avgs=[torch.zeros(k + 1)]), r"exp_avgs\[0\] must have one entry per trained entry"),
        (dict(exp_avg_sqs=[torch.zeros(k, dtype=torch.bfloat16)]), r"exp_avg_sqs\[0\] must be Float"),
        (dict(steps=[torch.zeros(2)]), r"steps\[0\] must be a float32 tensor with one element"),
        (dict(params=[params[0].t()]), r"params\[0\] must be contiguous"),
        (dict(params=[params[0].long()]), r"params\[0\] must be float32, float16 or bfloat16"),
        (dict(grads=[grads[0], grads[0]]), r"need one entry per parameter"),
        (dict(indices=[torch.arange(33, dtype=torch.int32)], exp_avgs=[torch.zeros(33)], exp_avg_sqs=[torch.zeros(33)]),
         r"indices\[0\] has 33 entries but params\[0\] has only 32 elements"),
    ]
    for change, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call(**change)
    with pytest.raises(RuntimeError, match=r"beta1 must be in \[0, 1\)"):
        op(params, grads, masks, m, v, s, 1e-3, 1.0, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match=r"grad_scale must be a float32 tensor with one element"):
        op(params, grads, masks, m, v, s, *h, torch.ones(2), None)


@pytest.mark.parametrize("device", devices())
def test_many_tensors_of_varied_sizes(device):
    # Exercises the per-block tensor lookup: tensors smaller than, equal to and larger than one
    # chunk of work, and tensors whose masks are empty (skipped) in between.
    gen = torch.Generator().manual_seed(5)
    sizes = [int(s) for s in torch.randint(1, 9000, (40,), generator=gen)] + [4096, 8192, 1, 2]
    shapes = [((n,), i % 7 == 3) for i, n in enumerate(sizes)]
    problem = make_problem(shapes, torch.float32, device, density=0.4)
    problem[2][5] = problem[2][5][:0]  # an empty mask in the middle
    problem[3][5], problem[4][5] = problem[3][5][:0], problem[4][5][:0]
    expected = clone_all(problem)
    run_steps(sparse_adamw_step, problem, 3)
    run_steps(sparse_adamw_step_reference, expected, 3)
    for got, ref in zip(problem[0], expected[0]):
        assert_close(got, ref, scale=10)


@pytest.mark.cuda
def test_one_cuda_launch_per_dtype():
    from torch.profiler import ProfilerActivity, profile

    shapes = [((n,), False) for n in (100, 5000, 77, 12000, 3)] + [((64,), True)]
    a = make_problem(shapes, torch.float32, "cuda")
    b = make_problem(shapes[:2], torch.bfloat16, "cuda")
    both = [x + y for x, y in zip(a, b)]
    for s in both[5]:
        s += 1
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sparse_adamw_step(*both, **HYPER)
        torch.cuda.synchronize()
    launches = [e.name for e in prof.events() if "sparse_adamw_kernel" in e.name]
    assert len(launches) == 2, launches  # one for the 6 float32 tensors, one for the 2 bf16 ones
