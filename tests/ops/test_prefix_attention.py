"""Prefix-KV attention op against concat + SDPA: outputs and all gradients, dtypes, GQA, prefix
lengths, odd sequence lengths, masks, prefix banks, empty batches; opcheck; memory; bad input."""

import pytest
import torch

from fastpeft.ops import prefix_attention, prefix_attention_reference
from tests.utils import DTYPES, assert_close, assert_error_within, devices, saved_tensors

# (B, H, Hkv, Sq, Skv, D, N, P)
SHAPES = [
    (2, 4, 4, 7, 7, 16, 1, 1),  # MHA, one prefix position, odd S
    (3, 8, 2, 9, 9, 32, 3, 16),  # GQA 4:1, bank of 3 sets
    (2, 6, 3, 33, 33, 24, 2, 100),  # P > one 64-key tile, D not a multiple of 16
    (1, 4, 1, 1, 13, 16, 1, 16),  # decoding: one query over a cache (MQA)
    (2, 4, 2, 5, 12, 16, 2, 16),  # chunked prefill: Sq < Skv, causal aligned to the last key
]
MASKS = ["none", "padding", "full"]


def make_inputs(shape, dtype, device, mask_kind="none", requires_grad=True, index="mixed"):
    B, H, Hkv, Sq, Skv, D, N, P = shape

    def leaf(*size):
        return torch.randn(*size, device=device).to(dtype).requires_grad_(requires_grad)

    q, k, v = leaf(B, H, Sq, D), leaf(B, Hkv, Skv, D), leaf(B, Hkv, Skv, D)
    prefix_k, prefix_v = leaf(N, Hkv, P, D), leaf(N, Hkv, P, D)
    prefix_index = None if index == "shared" else torch.arange(B, device=device) % N
    mask = None
    if mask_kind == "padding":  # left padding; example 0 hides its first keys (its early rows see only the prefix)
        mask = torch.ones(B, Skv, dtype=torch.bool, device=device)
        mask[0, : min(3, Skv - 1)] = False
    elif mask_kind == "full":  # additive float mask per head, with one fully hidden row
        mask = torch.randn(B, H, Sq, Skv, device=device).to(dtype)
        mask[..., 0, :] = float("-inf")
    return q, k, v, prefix_k, prefix_v, prefix_index, mask


def forward_backward(fn, inputs, grad_out, causal=True):
    q, k, v, pk, pv, index, mask = inputs
    out = fn(q, k, v, pk, pv, index, mask, causal)
    return out, torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)


def upcast(inputs):
    return tuple(
        t.detach().float().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point() else t for t in inputs
    )


def eager_reference(q, k, v, prefix_k, prefix_v, prefix_index=None, attention_mask=None, causal=True):
    """The plain-PyTorch low-precision path, as HF's eager attention runs it over peft's
    concatenated cache: matmuls in the input dtype, softmax in fp32 rounded back."""
    from fastpeft.ops.prefix_attention import sequence_bias

    B, H, Sq, D = q.shape
    Hkv, Skv, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    index = torch.zeros(B, dtype=torch.long, device=q.device) if prefix_index is None else prefix_index
    keys = torch.cat([prefix_k[index], k], 2).repeat_interleave(H // Hkv, dim=1)
    values = torch.cat([prefix_v[index], v], 2).repeat_interleave(H // Hkv, dim=1)
    bias = sequence_bias(attention_mask, causal, B, Sq, Skv, q.dtype, q.device)
    bias = torch.cat([torch.zeros(*bias.shape[:3], P, dtype=q.dtype, device=q.device), bias], -1)
    scores = (q @ keys.transpose(-1, -2)) * D**-0.5 + bias
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


def check_against_reference(inputs, causal=True):
    dtype = inputs[0].dtype
    grad_out = torch.randn_like(inputs[0])
    before = [t.detach().clone() if t is not None else None for t in inputs]
    out, grads = forward_backward(prefix_attention, inputs, grad_out, causal)
    for t, saved in zip(inputs, before):  # inputs are read, never written
        assert t is None or torch.equal(t, saved)
    assert out.shape == inputs[0].shape and out.dtype == dtype
    if dtype == torch.float32:
        out_ref, grads_ref = forward_backward(prefix_attention_reference, inputs, grad_out, causal)
        assert_close(out, out_ref, scale=10)
        for name, got, ref in zip("q k v prefix_k prefix_v".split(), grads, grads_ref):
            assert_close(got, ref, scale=10, msg=f"grad of {name}")
        return
    # Low precision: error against fp32 math on the same inputs at most 2x that of the plain
    # PyTorch path in that precision (flash-attention's rule; the eager path is its "plain" one).
    out_low, grads_low = forward_backward(eager_reference, inputs, grad_out, causal)
    out32, grads32 = forward_backward(prefix_attention_reference, upcast(inputs), grad_out.float(), causal)
    assert_error_within(out, out_low, out32)
    for got, low, ref32 in zip(grads, grads_low, grads32):
        assert_error_within(got, low, ref32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_concat_sdpa(device, dtype, shape, mask_kind):
    check_against_reference(make_inputs(shape, dtype, device, mask_kind))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask_kind", MASKS)
def test_not_causal(device, mask_kind):
    check_against_reference(make_inputs((2, 4, 2, 6, 6, 16, 2, 16), torch.float32, device, mask_kind), causal=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_math_fallback_path(device, dtype, monkeypatch):
    # The plain-ATen sequence path that CUDA uses for head sizes the fused kernels reject.
    monkeypatch.setenv("FASTPEFT_PREFIX_SEQ_BACKEND", "math")
    for mask_kind in MASKS:
        check_against_reference(make_inputs((2, 4, 2, 7, 7, 16, 2, 16), dtype, device, mask_kind))
    check_against_reference(make_inputs((2, 4, 2, 3, 9, 16, 2, 16), dtype, device, "padding"))


@pytest.mark.parametrize("device", devices())
def test_query_longer_than_keys(device):
    # Causal aligned to the last key: the first Sq - Skv queries see only the prefix.
    check_against_reference(make_inputs((2, 4, 2, 9, 4, 16, 1, 8), torch.float32, device))


@pytest.mark.parametrize("device", devices())
def test_no_sequence_keys(device):
    # Skv = 0: attention over the prefix alone; k and v get empty gradients.
    check_against_reference(make_inputs((2, 4, 2, 5, 0, 16, 1, 8), torch.float32, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 5, 16, 2, 8), (2, 4, 2, 0, 0, 16, 2, 8)], ids=["B=0", "S=0"])
def test_empty_batch(device, shape):
    inputs = make_inputs(shape, torch.float32, device, index="shared")
    out, lse = prefix_attention(*inputs[:5], return_lse=True)
    assert out.shape == inputs[0].shape and lse.shape == inputs[0].shape[:3]
    grads = torch.autograd.grad(out.sum(), inputs[:5], allow_unused=True)
    for g, t in zip(grads, inputs[:5]):
        assert g is None or (g.shape == t.shape and not g.any())


@pytest.mark.parametrize("device", devices())
def test_shared_prefix_equals_index_zero(device):
    q, k, v, pk, pv, _, mask = make_inputs((3, 4, 2, 6, 6, 16, 2, 8), torch.float32, device, "padding")
    zeros = torch.zeros(3, dtype=torch.long, device=device)
    assert torch.equal(prefix_attention(q, k, v, pk, pv, None, mask), prefix_attention(q, k, v, pk, pv, zeros, mask))
    # int32 indices and indices on the CPU with inputs elsewhere are accepted too.
    assert torch.equal(prefix_attention(q, k, v, pk, pv, zeros.int().cpu(), mask), prefix_attention(q, k, v, pk, pv, zeros, mask))


@pytest.mark.parametrize("device", devices())
def test_bank_gradients_summed_per_set(device):
    # Set 1 serves examples 0 and 2, set 2 nobody: its gradient is exactly zero, and set 1's is
    # the sum of what each example alone gives it.
    q, k, v, pk, pv, _, _ = make_inputs((3, 4, 2, 5, 5, 16, 3, 8), torch.float32, device)
    index = torch.tensor([1, 0, 1], device=device)
    g = torch.randn_like(q)
    gpk, gpv = torch.autograd.grad(prefix_attention(q, k, v, pk, pv, index), (pk, pv), g)
    assert not gpk[2].any() and not gpv[2].any()
    alone = [torch.autograd.grad(prefix_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], pk, pv, index[b : b + 1]),
                                 (pk, pv), g[b : b + 1]) for b in (0, 2)]  # fmt: skip
    assert_close(gpk[1], alone[0][0][1] + alone[1][0][1], scale=10)
    assert_close(gpv[1], alone[0][1][1] + alone[1][1][1], scale=10)


@pytest.mark.parametrize("device", devices())
def test_hf_layout_and_non_contiguous_inputs(device):
    # HF hands q/k/v as transposes of [B, S, H, D]; the output comes back stored as [B, S, H, D].
    B, H, Hkv, S, D = 2, 4, 2, 6, 16
    q = torch.randn(B, S, H, D, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, device=device).transpose(1, 2).requires_grad_()
    pk = torch.randn(1, Hkv, D, 8, device=device).transpose(2, 3).requires_grad_()  # non-contiguous bank
    pv = torch.randn(1, Hkv, 8, D, device=device).requires_grad_()
    inputs = (q, k, v, pk, pv, None, None)
    out = prefix_attention(q, k, v, pk, pv)
    # The layout the device's fused kernels write: [B, S, H, D] storage on CUDA, contiguous on the CPU.
    assert out.is_contiguous() if device == "cpu" else out.transpose(1, 2).is_contiguous()
    check_against_reference(inputs)
    grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv))
    for g, t in zip(grads, (q, k, v, pk, pv)):
        assert g.stride() == t.stride()  # gradients in the layout of their inputs


@pytest.mark.parametrize("device", devices())
def test_frozen_sequence_only_prefix_trains(device):
    # Prefix tuning proper: only the bank requires grad.
    q, k, v, pk, pv, index, _ = make_inputs((2, 4, 2, 6, 6, 16, 2, 8), torch.float32, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    g = torch.randn_like(q)
    got = torch.autograd.grad(prefix_attention(q, k, v, pk, pv, index), (pk, pv), g)
    ref = torch.autograd.grad(prefix_attention_reference(q, k, v, pk, pv, index), (pk, pv), g)
    for a, b in zip(got, ref):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("device", devices())
def test_lse_is_log_sum_exp_of_joint_scores(device):
    q, k, v, pk, pv, index, mask = make_inputs((2, 4, 2, 6, 6, 16, 2, 8), torch.float32, device, "padding")
    _, lse = prefix_attention(q, k, v, pk, pv, index, mask, return_lse=True)
    from fastpeft.ops.prefix_attention import sequence_bias

    keys = torch.cat([pk[index], k], 2).repeat_interleave(2, dim=1)
    bias = sequence_bias(mask, True, 2, 6, 6, torch.float32, device)
    bias = torch.cat([torch.zeros(*bias.shape[:3], 8, device=device), bias], -1)
    scores = q @ keys.transpose(-1, -2) / 4.0 + bias
    assert_close(lse, scores.logsumexp(-1), scale=10)


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("variant", ["shared", "bank+padding", "gqa+full-mask"])
def test_opcheck(device, requires_grad, variant):
    shape, mask, index, causal, scale = {
        "shared": ((2, 4, 4, 5, 5, 16, 1, 3), "none", "shared", True, None),
        "bank+padding": ((3, 4, 2, 5, 5, 16, 2, 3), "padding", "mixed", False, 0.3),
        "gqa+full-mask": ((2, 4, 2, 4, 6, 8, 2, 3), "full", "mixed", True, None),
    }[variant]
    q, k, v, pk, pv, idx, m = make_inputs(shape, torch.float32, device, mask, requires_grad, index)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention, (q, k, v, pk, pv, idx, m, causal, scale))


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward(device):
    q, k, v, pk, pv, idx, m = make_inputs((3, 4, 2, 5, 5, 16, 2, 3), torch.float32, device, "padding", False)
    out, lse = torch.ops.fastpeft.prefix_attention(q, k, v, pk, pv, idx, m, True, None)
    g = torch.randn_like(q)
    op = torch.ops.fastpeft.prefix_attention_backward
    for need in ([True] * 5, [False, False, False, True, True], [True, True, True, False, False]):
        torch.library.opcheck(op, (g, q, k, v, pk, pv, idx, m, out, lse, True, None, need))


# ---- memory ----------------------------------------------------------------------------------------

# (B, H, Hkv, S, D, P): a long prefix over short sequences, so a batch-repeated prefix
# (B * Hkv * P * D elements) is larger than every tensor the op legitimately needs.
MEMORY_SHAPE = (8, 4, 2, 4, 32, 64)
# On CUDA the sequence kernels' workspaces count too: more examples and a longer prefix keep the
# repeated prefix (1 MiB) well above them and above the bank-sized gradient buffers.
CUDA_MEMORY_SHAPE = (16, 4, 2, 4, 32, 256)


def memory_inputs(device, shape=MEMORY_SHAPE):
    B, H, Hkv, S, D, P = shape
    leaf = lambda *s: torch.randn(*s, device=device).requires_grad_()  # noqa: E731
    return leaf(B, H, S, D), leaf(B, Hkv, S, D), leaf(B, Hkv, S, D), leaf(1, Hkv, P, D), leaf(1, Hkv, P, D)


def repeated_prefix_bytes(shape=MEMORY_SHAPE):
    B, _, Hkv, _, D, P = shape
    return B * Hkv * P * D * 4


def saved_tensor_sizes(fn, inputs):
    return [t.numel() * t.element_size() for t in saved_tensors(lambda: fn(*inputs))[0]]


def largest_cpu_allocation(fn, inputs, backward=True):
    """Largest single allocation while ``fn`` runs forward (and backward), from the profiler's
    memory timeline (which also sees allocations inside C++ ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True,
                 acc_events=True) as prof:
        out = fn(*inputs)
        if backward:
            out.sum().backward()
    timeline = prof._memory_profile().timeline  # (time, action, key, bytes)
    return max(size for _, action, _, size in timeline if "CREATE" in str(action) or "INCREMENT" in str(action))


@pytest.mark.parametrize("device", devices())
def test_saved_tensors_hold_no_repeated_prefix(device):
    inputs = memory_inputs(device)
    saved = saved_tensor_sizes(prefix_attention, inputs)
    assert max(saved) < repeated_prefix_bytes(), saved
    # q, k, v, the bank, out and lse: nothing else.
    assert len(saved) == 7
    # The check can fail: concat + SDPA saves the repeated prefix.
    assert max(saved_tensor_sizes(prefix_attention_reference, inputs)) >= repeated_prefix_bytes()


def test_no_repeated_prefix_allocated_cpu_split_path(monkeypatch):
    """On the split path a shared prefix reaches the fused CPU kernel as an expanded view: forward
    allocates no per-example copy. Backward's largest transient is the fused kernel's per-example
    prefix gradient (one repeated prefix, summed per set and freed), never [prefix; keys], which
    concat + SDPA builds in forward and saves for backward."""
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", "split")
    inputs = memory_inputs("cpu")
    assert largest_cpu_allocation(prefix_attention, inputs, backward=False) < repeated_prefix_bytes()
    ours = largest_cpu_allocation(prefix_attention, inputs)
    assert ours <= repeated_prefix_bytes()
    assert largest_cpu_allocation(prefix_attention_reference, inputs, backward=False) > repeated_prefix_bytes()
    assert largest_cpu_allocation(prefix_attention_reference, inputs) > ours


def test_joint_cpu_path_builds_prefix_and_keys_only_transiently(monkeypatch):
    """The CPU's joint path (one fused call over [prefix; keys]) allocates at most what concat +
    SDPA allocates and saves only what the split path saves: [prefix; keys] lives inside forward
    and inside backward, never between them."""
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", "joint")
    inputs = memory_inputs("cpu")
    B, H, Hkv, S, D, P = MEMORY_SHAPE
    joint_keys_bytes = B * Hkv * (P + S) * D * 4
    assert largest_cpu_allocation(prefix_attention, inputs) <= largest_cpu_allocation(prefix_attention_reference, inputs)
    assert largest_cpu_allocation(prefix_attention, inputs, backward=False) >= joint_keys_bytes  # [prefix; keys] built
    saved = saved_tensor_sizes(prefix_attention, inputs)
    assert len(saved) == 7 and max(saved) < repeated_prefix_bytes(), saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("path", ["split", "joint"])
def test_each_cpu_path_matches_concat_sdpa(dtype, shape, mask_kind, path, monkeypatch):
    # Both CPU paths forced (the default picks joint for these short sequences), causal or not.
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", path)
    assert cpu_forward_kernel_calls(8, causal=True) == (1 if path == "joint" else 2)
    for causal in (True, False):
        torch.manual_seed(0)  # each check on the draw the other tests use (conftest seeds 0)
        check_against_reference(make_inputs(shape, dtype, "cpu", mask_kind), causal=causal)


def cpu_forward_kernel_calls(S, causal, P=64):
    """How many fused CPU attention calls one forward makes: 1 on the joint path, 2 on the split."""
    q, k, v, pk, pv = (torch.randn(1, h, n, 8) for h, n in ((2, S), (1, S), (1, S), (1, P), (1, P)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prefix_attention(q, k, v, pk, pv, causal=causal)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")


def test_cpu_path_choice(monkeypatch):
    # Causal sequences longer than the CPU kernel's 512-key block take the split path (its sequence
    # part skips key blocks past the diagonal); shorter ones and non-causal ones the joint path.
    assert cpu_forward_kernel_calls(512, causal=True) == 1
    assert cpu_forward_kernel_calls(520, causal=True) == 2
    assert cpu_forward_kernel_calls(520, causal=False) == 1
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", "split")
    assert cpu_forward_kernel_calls(16, causal=True) == 2
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", "joint")
    assert cpu_forward_kernel_calls(600, causal=True) == 1
    monkeypatch.setenv("FASTPEFT_PREFIX_CPU_PATH", "fastest")
    with pytest.raises(RuntimeError, match="FASTPEFT_PREFIX_CPU_PATH must be auto, split or joint"):
        cpu_forward_kernel_calls(16, causal=True)


@pytest.mark.cuda
def test_peak_memory_below_repeated_prefix_cuda():
    inputs = memory_inputs("cuda", CUDA_MEMORY_SHAPE)
    torch.cuda.synchronize()

    def peak(fn):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*inputs).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    ours = peak(prefix_attention)
    # out, lse, the sequence kernels' buffers, the q/k/v and bank gradients: below one repeated prefix.
    assert ours < repeated_prefix_bytes(CUDA_MEMORY_SHAPE)
    assert peak(prefix_attention_reference) > ours


# ---- CUDA-specific paths (flash / mem-efficient sequence kernels, head-size buckets) ---------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("mask_kind", ["none", "padding"])
def test_cuda_kernels_head_sizes(dtype, D, mask_kind):
    check_against_reference(make_inputs((2, 8, 2, 77, 77, D, 3, 100), dtype, "cuda", mask_kind))


@pytest.mark.cuda
def test_cuda_decode_step_with_bank():
    check_against_reference(make_inputs((4, 32, 8, 1, 300, 128, 4, 16), torch.bfloat16, "cuda"))


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors():
    q, k, v, pk, pv, idx, _ = make_inputs((2, 4, 2, 5, 5, 16, 2, 3), torch.float32, "cpu", requires_grad=False)
    cases = [
        (dict(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16)), "4 query heads of q must be a multiple of the 3 key/value heads"),
        (dict(prefix_index=torch.tensor([0, 2])), r"prefix_index must be in \[0, N=2\).*\[0, 2\]"),
        (dict(prefix_index=torch.tensor([-1, 0])), r"prefix_index must be in \[0, N=2\)"),
        (dict(prefix_index=torch.tensor([0, 1, 1])), r"prefix_index must be \[B=2\]"),
        (dict(prefix_index=torch.tensor([0.0, 1.0])), "prefix_index must be an int64"),
        (dict(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)), r"prefix_k must be \[N, Hkv=2, P, D=16\]"),
        (dict(prefix_k=torch.randn(2, 4, 3, 16), prefix_v=torch.randn(2, 4, 3, 16)), r"prefix_k must be \[N, Hkv=2, P, D=16\]"),
        (dict(prefix_v=torch.randn(2, 2, 4, 16)), "prefix_v must have the shape of prefix_k"),
        (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), r"k must be \[B=2, Hkv, Skv, D=16\]"),
        (dict(v=torch.randn(2, 2, 6, 16)), "v must have the shape of k"),
        (dict(prefix_k=pk.half(), prefix_v=pv.half()), r"prefix_k must be Float \(the dtype of q\)"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.bool)), r"attention_mask must be \[B=2, Skv=5\]"),
        (dict(attention_mask=torch.ones(2, 3, 5, 5)), r"attention_mask must be \[B=2, Skv=5\]"),
        (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), "attention_mask must be bool"),
        (dict(prefix_k=torch.randn(0, 2, 3, 16), prefix_v=torch.randn(0, 2, 3, 16), prefix_index=None), r"no prefix set \(N = 0\)"),
        (dict(q=torch.randn(2, 4, 5)), "q must be 4-D"),
    ]
    base = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, prefix_index=idx, attention_mask=None)
    for change, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            prefix_attention(**{**base, **change})
    with pytest.raises(ValueError, match="attention_mask is not differentiable"):
        prefix_attention(**{**base, "attention_mask": torch.zeros(2, 5, requires_grad=True)})


@pytest.mark.cuda
def test_bad_input_device_errors():
    q, k, v, pk, pv, idx, _ = make_inputs((2, 4, 2, 5, 5, 16, 2, 3), torch.float32, "cuda", requires_grad=False)
    with pytest.raises(RuntimeError, match="prefix_k is on cpu but q is on cuda"):
        prefix_attention(q, k, v, pk.cpu(), pv.cpu(), idx)
    with pytest.raises(RuntimeError, match=r"prefix_index must be in \[0, N=2\)"):
        prefix_attention(q, k, v, pk, pv, torch.tensor([0, 5], device="cuda"))


# ---- C++ autograd (csrc/prefix_attention/prefix_attention_autograd.cpp) ----------------------------


@pytest.mark.parametrize("name", ["q", "k", "v", "prefix_k", "prefix_v"])
def test_gradient_of_each_input_alone(name):
    """needs_input_grad is honoured per input: each gradient, asked for alone, equals the
    reference's, and no other input gets one."""
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    base = make_inputs((3, 4, 2, 5, 5, 16, 2, 3), torch.float32, "cpu", "padding", False)
    g = torch.randn_like(base[0])
    grads = []
    for fn in (prefix_attention, prefix_attention_reference):
        inputs = [t.detach().clone().requires_grad_(n == name) for n, t in zip(names, base[:5])]
        fn(*inputs, *base[5:]).backward(g)
        grads.append(inputs[names.index(name)].grad)
        assert all(t.grad is None for n, t in zip(names, inputs) if n != name)
    assert_close(grads[0], grads[1], scale=10)


def test_lse_output_gets_no_gradient():
    """The log-sum-exp output is not differentiable: a loss that also reads it gives the same
    gradients as one that reads only out."""
    inputs = make_inputs((2, 4, 2, 5, 5, 16, 2, 3), torch.float32, "cpu", "padding")
    out, lse = prefix_attention(*inputs, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    leaves = [inputs[i] for i in range(5)]
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + lse.sum(), leaves, retain_graph=True)
    want = torch.autograd.grad(out, leaves, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_autograd_is_the_cpp_kernel():
    """No Python register_autograd remains for prefix_attention: the Autograd kernel is the C++ one."""
    dump = torch._C._dispatch_dump("fastpeft::prefix_attention").splitlines()
    [line] = [entry for entry in dump if entry.startswith("Autograd[")]
    assert "prefix_attention_autograd.cpp" in line and "library.py" not in line, line
    inputs = make_inputs((2, 4, 2, 5, 5, 16, 1, 3), torch.float32, "cpu")
    assert "PrefixAttentionFunction" in prefix_attention(*inputs).grad_fn.name()


@pytest.mark.parametrize("device", devices())
def test_no_sequence_keys_with_a_strided_query(device):
    """Skv = 0 and q's last dim not contiguous: grad_q starts as zeros in a contiguous layout (the
    prefix kernels accumulate into it assuming one), whatever q's strides."""
    q, k, v, pk, pv, index, mask = make_inputs((2, 4, 2, 5, 0, 16, 2, 8), torch.float32, device)
    strided = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert strided.stride(-1) != 1 and torch.equal(strided, q)
    check_against_reference((strided, k, v, pk, pv, index, mask))
