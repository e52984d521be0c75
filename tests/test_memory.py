"""fastpeft.memory: saved-for-backward bytes and step peaks, checked exactly on steps whose answer is
known by construction."""

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.memory import StepMemory, measure_step, peak_bytes, saved_bytes

F32 = 4


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def mlp_step(model, x):
    def step():
        model(x).sum().backward()

    return step


def test_saved_bytes_of_a_tiny_mlp_by_hand():
    model, x = tiny_mlp(), torch.randn(5, 8)
    # Linear 1 saves x (for W1's grad); ReLU saves its output, which Linear 2 saves again as its input
    # (one storage, counted once); Linear 2 saves W2 (for the grad of its input). Biases: nothing.
    activations = 5 * 8 * F32 + 5 * 16 * F32
    m = measure_step(mlp_step(model, x), exclude=[model], peak=False)
    assert (m.saved_bytes, m.saved_storages) == (activations, 2)
    # Without exclude the weights W2 (and nothing of layer 1: x needs no grad) count too.
    assert saved_bytes(mlp_step(model, x)) == activations + 4 * 16 * F32
    # Excluding a tensor works like excluding its module; excluding x leaves only the ReLU output.
    assert saved_bytes(mlp_step(model, x), exclude=[model[2].weight, x]) == 5 * 16 * F32


def test_saved_bytes_count_views_of_one_storage_once():
    w = torch.randn(6, 10, requires_grad=True)
    base = torch.randn(4, 10, requires_grad=True)  # both need grad: each mul saves both views

    def step():
        y = (base[:2] * w[:2]).sum() + (base[2:] * w[2:4]).sum()  # two views of base, two of w
        y.backward()

    assert saved_bytes(step, exclude=[w]) == base.numel() * F32
    assert saved_bytes(step) == (base.numel() + w.numel()) * F32


def test_lora_linear_saves_x_and_the_shrink_output_only():
    layer = fastpeft.nn.LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8)
    x = torch.randn(10, 64)
    m = measure_step(lambda: layer(x).sum().backward(), exclude=[layer], peak=False)
    assert m.saved_bytes == 10 * 64 * F32 + 10 * 4 * F32, m


def test_cpu_peak_of_known_allocations():
    keep = []

    def step():
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000)  # 8000 B: 12000 live
        del a  # 8000
        c = torch.empty(1500)  # 14000: the peak
        del b, c  # 0
        keep.append(torch.empty(250))  # 1000, still live at the end
        return 7

    m = measure_step(step)
    assert isinstance(m, StepMemory) and m.device == "cpu" and m.result == 7
    assert m.peak_bytes == 14000
    assert peak_bytes(step, "cpu") == 14000


def test_cpu_peak_sees_allocations_inside_ops_and_backward():
    x = torch.randn(256, 256, requires_grad=True)

    def step():
        (x * 2).sum().backward()

    # Forward: x * 2 (256 KiB), freed once sum() ran (sum saves no tensor); backward: the grad of x
    # (256 KiB, stolen by x.grad) and scalars of 4 B (the CPU allocator does not round): one tensor
    # of x's size is the most that is ever live, plus a few scalars.
    peak = peak_bytes(step)
    assert x.numel() * F32 < peak <= x.numel() * F32 + 64, peak
    assert x.grad is not None
    assert peak_bytes(step) == peak  # reproducible


def test_measure_step_runs_the_step_once():
    calls = []
    measure_step(lambda: calls.append(1))
    measure_step(lambda: calls.append(1), peak=False)
    assert calls == [1, 1]


def test_bad_input_is_explained():
    with pytest.raises(TypeError, match="callable"):
        measure_step(123)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure_step(lambda: None, device="meta")
    with pytest.raises(TypeError, match="exclude takes tensors"):
        measure_step(lambda: None, exclude=["weight"])


@pytest.mark.cuda
def test_cuda_peak_of_known_allocations():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mib = 1 << 20

    def step():
        a = torch.empty(mib, device="cuda")  # 4 MiB (a multiple of the allocator's 512 B blocks)
        b = torch.empty(2 * mib, device="cuda")  # 12 MiB live
        del a
        c = torch.empty(mib // 2, device="cuda")  # 10 MiB
        del b, c

    assert peak_bytes(step, "cuda") == 12 * mib
    layer = fastpeft.nn.LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8).cuda()
    x = torch.randn(10, 64, device="cuda")
    m = measure_step(lambda: layer(x).sum().backward(), device="cuda", exclude=[layer])
    assert m.saved_bytes == 10 * 64 * F32 + 10 * 4 * F32 and m.peak_bytes > 0
