"""Prefix-KV attention: fastpeft vs concat + SDPA vs peft's path, forward and forward+backward.

Providers (all compute the same attention over P prefix + S causal sequence positions):
  fastpeft  torch.ops.fastpeft.prefix_attention (sequence part in PyTorch's fused kernels, prefix
            part and LSE merge in fastpeft's kernel; no [prefix; keys], no repeated prefix)
  sdpa      gather the prefix per example, cat in front of the keys, SDPA(enable_gqa) with a mask
  peft      what HF runs for peft's prefix tuning: the prefix repeated over the batch into the
            cache, cat with the keys, K/V heads repeated for GQA (a mask is present), SDPA
  floor     causal SDPA over the sequence alone (no prefix): the frozen op without any PEFT

Shapes: CPU-scaled defaults; ``--gpu-shapes`` runs the issue's Llama-3-8B layout (32 query heads,
8 kv heads, D = 128), P in 16..256, S in 512..8192, about 16k tokens per step, plus a bank of 64
per-example prefixes against one shared prefix. Results: benchmarks/results/<device>/
bench_prefix_attention.json (common.write_results).

    python benchmarks/bench_prefix_attention.py                 # CPU-scaled, CPU
    python benchmarks/bench_prefix_attention.py --device cuda --gpu-shapes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from fastpeft.ops import prefix_attention, prefix_attention_reference  # noqa: E402


def peft_path(q, k, v, prefix_k, prefix_v, prefix_index=None):
    """peft's prefix tuning as HF executes it with SDPA: a [B, Hkv, P, D] prefix per example in
    the cache (peft builds it by running the encoder on a batch-expanded prompt), DynamicCache's
    cat, repeat_kv because the prefix-extended mask is not None, then SDPA with that mask."""
    B, H, S, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[2]
    index = torch.zeros(B, dtype=torch.long, device=q.device) if prefix_index is None else prefix_index
    keys = torch.cat([prefix_k[index], k], dim=2)
    values = torch.cat([prefix_v[index], v], dim=2)
    keys = keys[:, :, None].expand(B, Hkv, H // Hkv, P + S, D).reshape(B, H, P + S, D)
    values = values[:, :, None].expand(B, Hkv, H // Hkv, P + S, D).reshape(B, H, P + S, D)
    mask = torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(P)[None, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def floor_path(q, k, v, prefix_k, prefix_v, prefix_index=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


PROVIDERS = {
    "fastpeft": lambda q, k, v, pk, pv, idx=None: prefix_attention(q, k, v, pk, pv, idx),
    "sdpa": lambda q, k, v, pk, pv, idx=None: prefix_attention_reference(q, k, v, pk, pv, idx),
    "peft": peft_path,
    "floor": floor_path,
}


def make_inputs(B, H, Hkv, S, D, P, N, dtype, device):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()

    index = torch.arange(B, device=device) % N if N > 1 else None
    return leaf(B, H, S, D), leaf(B, Hkv, S, D), leaf(B, Hkv, S, D), leaf(N, Hkv, P, D), leaf(N, Hkv, P, D), index


def useful_flops(B, H, S, D, P, backward):
    """Attention FLOPs of the visible (prefix + causal) scores: 4 per score element and head dim
    forward; backward is 2.5x forward (flash-attention's convention)."""
    forward = 4 * B * H * S * D * (P + (S + 1) / 2)
    return forward * (3.5 if backward else 1.0)


def bench_case(case, providers, dtype, device, reps):
    """Rows of every provider on one case, each mode timed with the providers interleaved
    (common.time_interleaved): on shared CPU cores back-to-back timing compares different machines.
    A provider that runs out of memory gets error rows."""
    B, H, Hkv, S, D, P, N = (case[k] for k in ("B", "H", "Hkv", "S", "D", "P", "N"))
    runs, errors = {}, []
    for provider in providers:
        torch.manual_seed(0)  # every provider sees the same values
        q, k, v, pk, pv, index = make_inputs(B, H, Hkv, S, D, P, N, dtype, device)
        fn, grad, leaves = PROVIDERS[provider], torch.randn_like(q), (q, k, v, pk, pv)

        def forward(fn=fn, leaves=leaves, index=index):
            with torch.no_grad():
                fn(*leaves, index)

        def forward_backward(fn=fn, leaves=leaves, index=index, grad=grad):
            torch.autograd.grad(fn(*leaves, index), leaves, grad, allow_unused=True)

        try:
            forward_backward()
        except torch.OutOfMemoryError:
            errors.append(provider)
            torch.cuda.empty_cache()
            continue
        runs[provider] = (fn, leaves, index, {"fwd": forward, "fwd+bwd": forward_backward})
    rows = []
    peaks = common.device_peaks(device)
    for mode in ("fwd", "fwd+bwd"):
        stats = common.time_interleaved({p: r[3][mode] for p, r in runs.items()}, device, warmup=2, reps=reps)
        for provider, (fn, leaves, index, modes) in runs.items():
            t = stats[provider]
            tflops = useful_flops(B, H, S, D, P, mode != "fwd") / (t["median_ms"] * 1e-3) / 1e12
            row = common.make_row("prefix_attention", case_label(case), mode, dtype, provider, t, **case,
                                  tflops=tflops, peak_bytes=common.peak_memory_bytes(modes[mode], device))  # fmt: skip
            if peaks:
                row["peak_bf16_tflops"] = peaks["bf16_tflops"]
            if mode != "fwd":
                row["saved_bytes"] = common.saved_activation_bytes(lambda fn=fn, leaves=leaves, index=index:
                                                                   fn(*leaves, index), exclude=leaves)  # fmt: skip
            rows.append(row)
        for provider in errors:
            rows.append(common.make_row("prefix_attention", case_label(case), mode, dtype, provider, **case,
                                        error="out of memory"))  # fmt: skip
    return rows


def case_label(case):
    """"S128 P16 B2 N1" (with the case's label in front where it has one): the row's ``case``."""
    text = "S{S} P{P} B{B} N{N}".format(**case)
    return f"{case['label']} {text}" if case.get("label") else text


def headline(cases):
    """The README row: fwd+bwd time of concat + SDPA and of peft's path over fastpeft's."""
    plain = [c for c in cases if not c.get("label")]
    ps = "/".join(str(p) for p in sorted({c["P"] for c in plain}))
    ss = "/".join(str(s) for s in sorted({c["S"] for c in plain}))
    return [{"what": f"prefix attention fwd+bwd (GQA, P {ps}, S {ss})", "where": {"mode": "fwd+bwd"},
             "cells": [{"text": "{}x vs concat+SDPA", "values": [{"ratio": ["sdpa", "fastpeft"]}]},
                       {"text": "{}x vs peft's path", "values": [{"ratio": ["peft", "fastpeft"]}]},
                       {"text": "useful FLOP/s at {} of this machine's GEMM throughput",
                        "values": [{"value": "fastpeft", "metric": "tflops_of_roofline"}]}]}]  # fmt: skip


def cases(gpu_shapes, quick=False):
    if quick:
        layout = dict(H=4, Hkv=2, D=16)
        shapes = [dict(S=32, P=8, B=2, N=1), dict(S=32, P=8, B=4, N=4, label="bank4")]
    elif gpu_shapes:  # Llama-3-8B attention layout, ~16k tokens per step
        layout = dict(H=32, Hkv=8, D=128)
        shapes = [dict(S=S, P=P, B=max(1, 16384 // S), N=1) for S in (512, 2048, 8192) for P in (16, 64, 256)]
        shapes += [dict(S=512, P=64, B=64, N=1, label="shared"), dict(S=512, P=64, B=64, N=64, label="bank64")]
    else:  # the same structure scaled for a 2-core CPU
        layout = dict(H=8, Hkv=2, D=64)
        shapes = [dict(S=S, P=P, B=2, N=1) for S in (128, 512) for P in (16, 64)]
        shapes += [dict(S=128, P=16, B=8, N=1, label="shared"), dict(S=128, P=16, B=8, N=8, label="bank8")]
    return [{**layout, **s} for s in shapes]


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-shapes", action="store_true", help="the issue's Llama-3-8B shapes")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = common.add_common_args(parser, threads=None).parse_args(argv)
    device, dtype = common.setup(args)
    reps = args.reps or (20 if device.startswith("cuda") else 15)
    rows = []
    todo = cases(args.gpu_shapes, args.quick)
    for case in todo:
        rows += bench_case(case, args.providers.split(","), dtype, device, reps)
    name = "bench_prefix_attention" + ("_quick" if args.quick else "")
    config = {"shapes": "quick" if args.quick else "gpu" if args.gpu_shapes else "cpu-scaled", "reps": reps}
    return common.finish(args, device, name, "prefix_attention", rows, headline(todo), config,
                         columns=common.TABLE_COLUMNS + ["tflops"])  # fmt: skip


if __name__ == "__main__":
    main()
