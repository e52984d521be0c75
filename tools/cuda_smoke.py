"""One small forward + backward of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

The correctness of each kernel is the test suite's job (tests marked ``cuda``); this script only
makes every kernel run once at a small, odd size so that the sanitizer sees each of them:

    compute-sanitizer --tool memcheck  python3 tools/cuda_smoke.py
    compute-sanitizer --tool racecheck python3 tools/cuda_smoke.py

It prints one line per case and exits non-zero when a case raises or produces a non-finite value;
its last line names every ``fastpeft::`` operator that ran (the test suite checks that each
registered operator is among them, so a new op cannot miss its case here).
``FASTPEFT_SMOKE_DEVICE=cpu`` runs the same cases on the CPU kernels (the test suite does, so the
script cannot rot between GPU sessions).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch import nn

import fastpeft
from fastpeft import nn as fnn
from fastpeft.ops import prefix_attention

DEV = os.environ.get("FASTPEFT_SMOKE_DEVICE", "cuda")


def _linear(i, o, dtype=torch.float32, bias=True):
    return nn.Linear(i, o, bias=bias).to(DEV, dtype)


def _linear4bit(i, o, quant_type="nf4", dtype=torch.bfloat16):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=dtype, quant_type=quant_type, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(o, i) * 0.05, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True)  # fmt: skip
    return layer.to(DEV)


def _linear8bit(i, o):
    import bitsandbytes as bnb

    dense = nn.Linear(i, o)
    layer = bnb.nn.Linear8bitLt(i, o, bias=True, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to(DEV)  # quantizes to int8 rows (CB) with per-row scales (SCB)


def _backward(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().square().mean().backward()
    return out


def case_dequantize():
    from fastpeft.ops import dequantize_4bit
    from fastpeft.quant import Quant4bitWeight

    for qt in ("nf4", "fp4"):
        w = dequantize_4bit(Quant4bitWeight.from_bnb(_linear4bit(136, 72, qt)), dtype=torch.bfloat16)
    return w


def case_lora_dense():
    layer = fnn.LoRALinear(_linear(123, 431, torch.bfloat16), r=7, lora_alpha=14, lora_dropout=0.1)
    x = torch.randn(3, 17, 123, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return _backward(layer(x))


def case_lora_4bit():
    layer = fnn.LoRALinear(_linear4bit(128, 200), r=16, lora_alpha=16, lora_dropout=0.05)
    x = torch.randn(2, 9, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return _backward(layer(x))


def case_dora():
    # 4-bit base, dropout in training (dropout_apply, dropout_apply_add_), then eval (base product reused).
    layer = fnn.LoRALinear(_linear4bit(128, 200), r=16, lora_alpha=16, lora_dropout=0.1, use_dora=True)
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(2, 9, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    _backward(layer(x))
    layer.eval()
    return _backward(layer(x))


def case_lora_group():
    q, k, v = (fnn.LoRALinear(_linear(96, o, torch.bfloat16), r=8, lora_alpha=8, lora_dropout=0.1) for o in (96, 32, 32))
    x = torch.randn(2, 11, 96, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return _backward(torch.cat(fnn.LoRAProjectionGroup([q, k, v])(x), dim=-1))


def case_int8_bases():
    """Every linear family on a bitsandbytes int8 base (LLM.int8() weights dequantized per call)."""
    x = torch.randn(3, 5, 96, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    outs = [fnn.LoRALinear(_linear8bit(96, 40), r=4, lora_alpha=8, lora_dropout=0.1)(x),
            fnn.IA3Linear(_linear8bit(96, 40), is_feedforward=False)(x),
            fnn.IA3Linear(_linear8bit(96, 40), is_feedforward=True)(x)]  # fmt: skip
    base = _linear8bit(96, 40)
    idx = torch.randperm(96 * 40, device=DEV)[:77].sort().values
    outs.append(fnn.SparseDeltaLinear(base, idx, torch.randn(77, device=DEV) * 0.01)(x))
    multi = fnn.MultiLoRALinear(_linear8bit(96, 40))
    multi.add_adapter("a", r=3, lora_alpha=3)
    multi.add_adapter("b", r=9, lora_alpha=9)
    outs.append(multi(x, torch.tensor([1, -1, 0], device=DEV)))
    return _backward(sum(o.float() for o in outs))


def case_linear_cross_entropy():
    from fastpeft.ops import linear_cross_entropy
    from fastpeft.quant import Quant4bitWeight

    hidden = torch.randn(3, 41, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 41), device=DEV)
    labels[0, :7] = -100
    A = (torch.randn(8, 128, device=DEV) * 0.05).to(torch.bfloat16).requires_grad_(True)
    B = (torch.randn(1000, 8, device=DEV) * 0.05).to(torch.bfloat16).requires_grad_(True)
    head = Quant4bitWeight.from_bnb(_linear4bit(128, 1000))
    loss = linear_cross_entropy(hidden, head, labels, lora_A=A, lora_B=B, lora_scaling=2.0, softcap=30.0,
                                chunk_tokens=50)  # fmt: skip
    loss.backward()
    return loss


def case_multi_lora():
    layer = fnn.MultiLoRALinear(_linear(130, 70, torch.bfloat16))
    for name, r in (("a", 1), ("b", 16), ("c", 72)):
        layer.add_adapter(name, r=r, lora_alpha=2 * r)
    x = torch.randn(5, 7, 130, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return _backward(layer(x, torch.tensor([2, 0, -1, 1, 2])))


def case_multi_lora_paths():
    # Every path forced once (grouped: CUTLASS grouped GEMM in bf16 plus the layout's gathers and
    # scatters; bgmv: the decode forward), on aligned rows with mixed ranks, an unused adapter,
    # rows with no adapter and dropout; bgmv is CUDA-only.
    layer = fnn.MultiLoRALinear(_linear(128, 64, torch.bfloat16), dtype=torch.bfloat16)
    for name, r in (("a", 8), ("b", 16), ("c", 3), ("unused", 8)):
        layer.add_adapter(name, r=r, lora_alpha=2 * r, lora_dropout=0.1)
    index = torch.tensor([2, 0, -1, 1, 2, 0], device=DEV)
    out = None
    for path in ("grouped", "bgmv") if DEV == "cuda" else ("grouped",):
        os.environ["FASTPEFT_MULTI_LORA_PATH"] = path
        try:
            x = torch.randn(6, 9, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            out = _backward(layer(x, index))
        finally:
            os.environ.pop("FASTPEFT_MULTI_LORA_PATH")
    return out


def case_ia3():
    out_side = fnn.IA3Linear(_linear(77, 45), is_feedforward=False, num_tasks=5)
    ff = fnn.IA3Linear(_linear(77, 45), is_feedforward=True, num_tasks=5)
    x = torch.randn(4, 6, 77, device=DEV, requires_grad=True)
    ids = torch.tensor([4, 0, 4, 2], device=DEV)
    _backward(out_side(x, task_ids=ids) + ff(x, task_ids=ids))
    folded = fnn.IA3Linear(_linear4bit(128, 64), is_feedforward=False)  # single task: folded into dequant
    x4 = torch.randn(2, 5, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return _backward(folded(x4))


def case_ia3_scale():
    from fastpeft.ops import ia3_scale

    x = torch.randn(4, 9, 77, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    vectors = torch.rand(3, 77, device=DEV, requires_grad=True)
    y = _backward(ia3_scale(x, vectors, torch.tensor([2, 0, 2, 1], device=DEV)))
    torch.ops.fastpeft.ia3_scale_(x.detach().clone(), vectors.detach(), None if vectors.shape[0] == 1 else
                                  torch.tensor([1, 1, 0, 2], device=DEV))  # fmt: skip
    return y


def case_adapter():
    bank = fnn.BottleneckAdapter(72, 12, "gelu", num_adapters=3).to(DEV)
    lang = fnn.BottleneckAdapter(72, 8, "gelu", num_adapters=2).to(DEV)  # a stack shares its activation
    h = torch.randn(3, 10, 72, device=DEV, requires_grad=True)
    _backward(bank(h, adapter_ids=torch.tensor([2, 0, 2], device=DEV)))
    stack = fnn.BottleneckAdapterStack([lang, bank])
    return _backward(stack(h, adapter_ids=[torch.tensor([1, 0, 1], device=DEV), torch.tensor([0, 2, 1], device=DEV)]))


def case_sparse_adamw():
    w = nn.Parameter(torch.randn(300, 77, device=DEV))
    b = nn.Parameter(torch.randn(300, device=DEV))
    idx = torch.randperm(w.numel(), device=DEV)[:500].sort().values.to(torch.int32)
    opt = fastpeft.optim.SparseMaskedAdamW([w, b], masks=[idx, None], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        (w.square().sum() + b.sum()).backward()
        opt.step()
        opt.zero_grad()
    return w


def case_sparse_delta():
    for base in (_linear(96, 50), _linear4bit(128, 64)):
        n = base.in_features * base.out_features
        idx = torch.randperm(n, device=DEV)[: n // 50].sort().values
        layer = fnn.SparseDeltaLinear(base, idx, torch.randn(idx.numel(), device=DEV) * 0.01)
        dtype = torch.float32 if type(base) is nn.Linear else torch.bfloat16
        out = _backward(layer(torch.randn(3, 7, base.in_features, device=DEV, dtype=dtype, requires_grad=True)))
    return out


def case_masked_weight_grads():
    from fastpeft.optim import random_mask, use_masked_weight_grads

    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Sequential(_linear(96, 50, dtype), nn.Tanh(), _linear(50, 24, dtype, bias=False))
        mask = random_mask(model, keep_ratio=0.02, include=lambda n, p: n.endswith("weight"), seed=0)
        assert use_masked_weight_grads(model, mask).patched == ["0", "2"]
        out = _backward(model(torch.randn(3, 7, 96, device=DEV, dtype=dtype, requires_grad=True)))
        assert torch.count_nonzero(model[0].weight.grad) <= mask["0.weight"].numel()
    return out


def case_prefix_attention():
    for dtype in (torch.bfloat16, torch.float32):
        B, H, Hkv, S, D, P, N = 3, 8, 2, 37, 64, 19, 4
        q = torch.randn(B, H, S, D, device=DEV, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(2))
        pk, pv = (torch.randn(N, Hkv, P, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(2))
        mask = torch.ones(B, S, dtype=torch.bool, device=DEV)
        mask[0, :5] = False
        out = _backward(prefix_attention(q, k, v, pk, pv, torch.tensor([3, 0, 3], device=DEV), mask, True, None))
    return out


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible")
        return 2
    torch.manual_seed(0)
    print(f"fastpeft {fastpeft.build_info()} on {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}")
    failed = 0
    from torch.profiler import ProfilerActivity, profile

    ran = set()
    for case in CASES:
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = case()
            if DEV == "cuda":
                torch.cuda.synchronize()
            ran |= {e.name for e in prof.events() if e.name.startswith("fastpeft::")}
            ok = bool(torch.isfinite(out.detach().float()).all())
            print(f"{'ok  ' if ok else 'NaN '} {case.__name__}")
            failed += not ok
        except Exception:  # report every case, then fail
            failed += 1
            print(f"FAIL {case.__name__}\n{traceback.format_exc()}")
    print(f"{len(CASES) - failed}/{len(CASES)} cases ran")
    print("fastpeft ops run:", " ".join(sorted(ran)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
