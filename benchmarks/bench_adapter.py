"""Bottleneck adapter benchmark: fastpeft's fused op vs the unfused PyTorch module (what the adapters
library runs: Linear, activation, Linear, scale, residual add) vs the plain-PyTorch reference, with
the bare residual add as the floor.

Cases: one adapter (Pfeiffer / SeqBn placement, relu), one adapter with layer norm (gelu), a bank
of N adapters with per-example ids, a MAD-X stack (language then task adapter), and adaptable
adapters: the learnable rational activation (fused into the op; the unfused module evaluates it
with PyTorch's elementwise ops) alone and with the training-time Gumbel-softmax switch. Forward (no
grad) and forward+backward; median / p20 / p80 ms and the bytes autograd saves (CPU) or the peak
memory (CUDA).

  python benchmarks/bench_adapter.py                # CPU-scaled shapes
  python benchmarks/bench_adapter.py --gpu-shapes   # Llama-3-8B hidden size (needs a GPU)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from fastpeft.nn import AdaptableAdapter, BottleneckAdapter, BottleneckAdapterStack  # noqa: E402
from fastpeft.nn.adaptable_adapter import AdaptableAdapterReference  # noqa: E402
from fastpeft.nn.rational import fit_rational  # noqa: E402
from fastpeft.ops import bottleneck_adapter_reference  # noqa: E402
from fastpeft.ops.adapter import rational_reference  # noqa: E402

CPU_SHAPES = dict(tokens=2048, seq=128, hidden=768, r=48, bank=8)
GPU_SHAPES = dict(tokens=16384, seq=512, hidden=4096, r=256, bank=8)
QUICK_SHAPES = dict(tokens=64, seq=16, hidden=64, r=8, bank=4)


def headline(bank):
    """The README row: fwd+bwd time of the unfused PyTorch module over fastpeft's, over the cases."""
    return [{"what": f"bottleneck adapter fwd+bwd (single, bank of {bank}, stack of 2)", "where": {"mode": "fwd+bwd"},
             "cells": [{"text": "{}x vs the unfused PyTorch module", "values": [{"ratio": ["unfused", "fastpeft"]}]},
                       {"text": "activation traffic at {} of this machine's triad bandwidth",
                        "values": [{"value": "fastpeft", "metric": "gbps_of_roofline"}]},
                       {"text": ""}]}]  # fmt: skip


class UnfusedAdapter(nn.Module):
    """The adapters library's Adapter module (LN?, Linear, act, Linear, * scaling, + residual)."""

    def __init__(self, d, r, act, ln_before, dtype, device):
        super().__init__()
        self.ln = nn.LayerNorm(d, device=device, dtype=dtype) if ln_before else None
        self.down = nn.Linear(d, r, device=device, dtype=dtype)
        self.up = nn.Linear(r, d, device=device, dtype=dtype)
        if act == "rational":  # adaptable adapters: the rational in PyTorch elementwise ops
            self.coeffs = nn.Parameter(fit_rational("leaky_relu").to(device, dtype))
            self.act = lambda z: rational_reference(z, self.coeffs)
        else:
            self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]
        self.scaling = 1.0

    def forward(self, x, residual):
        h = self.ln(x) if self.ln is not None else x
        return self.up(self.act(self.down(h))) * self.scaling + residual


def ours_from(unfused: UnfusedAdapter, act, dtype, device, index=0, layer=None):
    layer = layer or BottleneckAdapter(unfused.down.in_features, unfused.down.out_features, act,
                                       ln_before=unfused.ln is not None, device=device, dtype=dtype)  # fmt: skip
    layer.load_adapter(index, unfused.down, unfused.up, unfused.ln)
    if act == "rational":
        with torch.no_grad():
            layer.rational_coeffs[index].copy_(unfused.coeffs)
    return layer


def stage_dict(layer: BottleneckAdapter):
    return dict(down_weight=[layer.down_weight], down_bias=[layer.down_bias], up_weight=[layer.up_weight],
                up_bias=[layer.up_bias], ln_weight=[layer.ln_weight] if layer.ln_before else None,
                ln_bias=[layer.ln_bias] if layer.ln_before else None)  # fmt: skip


def bench(providers, device, mode, inputs, reps):
    """Interleaved timing of every provider ({name: (fn, params)}); saved bytes on CPU, peak on CUDA."""
    runs = {name: common.runner(fn, mode, [*params, *inputs]) for name, (fn, params) in providers.items()}
    stats = common.time_interleaved(runs, device, warmup=2, reps=reps)
    for name, (fn, params) in providers.items():
        stats[name]["peak_bytes"] = common.peak_memory_bytes(runs[name], device)
        if mode == "fwd+bwd" and not device.startswith("cuda"):
            stats[name]["saved_bytes"] = common.saved_activation_bytes(fn, exclude=tuple(params))
    return stats


def rows_for(shapes, dtype, device, reps):
    rows = []
    M, S, d, r, N = shapes["tokens"], shapes["seq"], shapes["hidden"], shapes["r"], shapes["bank"]
    B = M // S
    x = torch.randn(B, S, d, dtype=dtype, device=device, requires_grad=True)
    h = torch.randn(B, S, d, dtype=dtype, device=device, requires_grad=True)
    cases = []
    for act, ln in (("relu", False), ("gelu", True)):
        unfused = UnfusedAdapter(d, r, act, ln, dtype, device)
        ours = ours_from(unfused, act, dtype, device)
        st = stage_dict(ours)
        ref = lambda st=st, act=act: bottleneck_adapter_reference(x, scalings=[1.0], activation=act, residual=h, **st)
        cases.append((f"single-{act}{'-ln' if ln else ''}", dict(
            fastpeft=(lambda ours=ours: ours(x, residual=h), list(ours.parameters())),
            unfused=(lambda unfused=unfused: unfused(x, h), list(unfused.parameters())),
            reference=(ref, list(ours.parameters())),
            floor=(lambda: x + h, []),
        )))  # fmt: skip
    # A bank of N adapters, each example its own.
    unfused_bank = [UnfusedAdapter(d, r, "relu", False, dtype, device) for _ in range(N)]
    bank = BottleneckAdapter(d, r, "relu", num_adapters=N, device=device, dtype=dtype)
    for i, u in enumerate(unfused_bank):
        ours_from(u, "relu", dtype, device, index=i, layer=bank)
    ids = torch.randint(0, N, (B,), device=device)

    def unfused_loop():  # the plain way: run each adapter on its examples, scatter back
        out = torch.empty_like(x)
        for i, u in enumerate(unfused_bank):
            sel = (ids == i).nonzero().flatten()
            if sel.numel():
                out[sel] = u(x[sel], h[sel])
        return out

    cases.append((f"bank-{N}", dict(
        fastpeft=(lambda: bank(x, residual=h, adapter_ids=ids), list(bank.parameters())),
        unfused=(unfused_loop, [p for u in unfused_bank for p in u.parameters()]),
        floor=(lambda: x + h, []),
    )))  # fmt: skip
    # MAD-X stack: a language adapter then a task adapter, each from a bank.
    lang = BottleneckAdapter(d, r, "relu", num_adapters=N, device=device, dtype=dtype)
    task = BottleneckAdapter(d, r, "relu", num_adapters=N, device=device, dtype=dtype)
    stack = BottleneckAdapterStack([lang, task])
    lang_ids, task_ids = torch.randint(0, N, (B,), device=device), torch.randint(0, N, (B,), device=device)
    cases.append((f"stack-2x{N}", dict(
        fastpeft=(lambda: stack(x, adapter_ids=[lang_ids, task_ids]), list(stack.parameters())),
        two_calls=(lambda: task(lang(x, adapter_ids=lang_ids), adapter_ids=task_ids), list(stack.parameters())),
        floor=(lambda: x + h, []),
    )))  # fmt: skip
    # Adaptable adapters: the rational activation alone (a decided switch), then with the training
    # switch (a Gumbel-softmax draw mixing adapter and skip) against the same in plain PyTorch.
    unfused_rational = UnfusedAdapter(d, r, "rational", False, dtype, device)
    rational = ours_from(unfused_rational, "rational", dtype, device)
    cases.append(("rational", dict(
        fastpeft=(lambda: rational(x, residual=h), list(rational.parameters())),
        unfused=(lambda: unfused_rational(x, h), list(unfused_rational.parameters())),
        floor=(lambda: x + h, []),
    )))  # fmt: skip
    adaptable = AdaptableAdapter(d, r, device=device, dtype=dtype).train()
    plain = AdaptableAdapter(d, r, device=device, dtype=dtype).train()
    plain.load_state_dict(adaptable.state_dict())
    plain.__class__ = AdaptableAdapterReference
    cases.append(("adaptable-switch", dict(
        fastpeft=(lambda: adaptable(x, residual=h), list(adaptable.parameters())),
        unfused=(lambda: plain(x, residual=h), list(plain.parameters())),
        floor=(lambda: x + h, []),
    )))  # fmt: skip
    for case, providers in cases:
        for mode in ("fwd", "fwd+bwd"):
            for name, st in bench(providers, device, mode, [x, h], reps).items():
                row = common.make_row("adapter", case, mode, dtype, name, st, M=M, d=d, r=r)
                row["gbps"] = activation_bytes(M, d, x.element_size(), mode) / (st["median_ms"] * 1e-3) / 1e9
                rows.append(row)
    return rows


def activation_bytes(M: int, d: int, elem: int, mode: str) -> int:
    """The [M, d] activation traffic any adapter layer must pay (the weights, r x d, are small next to
    it): forward reads x and the residual and writes the output; backward also reads the output
    gradient and writes the gradients of x and of the residual."""
    return (3 if mode == "fwd" else 6) * M * d * elem


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-shapes", action="store_true")
    args = common.add_common_args(parser).parse_args(argv)
    device, dtype = common.setup(args)
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.gpu_shapes else CPU_SHAPES
    reps = args.reps or (50 if device.startswith("cuda") else 10)
    rows = rows_for(shapes, dtype, device, reps)
    name = "bench_adapter" + ("_quick" if args.quick else "_gpu_shapes" if args.gpu_shapes else "")
    config = dict(shapes=shapes, reps=reps, threads=args.threads)
    return common.finish(args, device, name, "adapter", rows, headline(shapes["bank"]), config)


if __name__ == "__main__":
    main()
