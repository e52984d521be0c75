"""Fused linear cross-entropy (causal-LM head + loss) vs transformers' unfused path.

Providers, forward + backward of ``loss(h)`` for one step:
  fastpeft   ``fastpeft.ops.linear_cross_entropy`` (chunks of tokens, no [tokens, vocab] tensor)
  reference  ``F.linear`` then float32 ``F.cross_entropy``, as transformers computes a causal-LM loss
  floor      the head GEMM alone, forward and its backward into h (``(h @ W^T).sum()``)
Memory: the bytes autograd saves for backward (exact, any device) and, on CUDA, the peak allocated.

  python benchmarks/bench_linear_cross_entropy.py           # CPU shapes; Llama-3-8B head on GPU
  python benchmarks/bench_linear_cross_entropy.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

from fastpeft.ops import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

SHAPES = {  # (tokens, hidden, vocab)
    "llama8b": [(2048, 4096, 128256), (8192, 4096, 128256)],
    "cpu": [(512, 384, 30522), (1024, 512, 32000)],
    "quick": [(64, 64, 1000)],
}


def headline():
    """README row: time vs the unfused path and vs the GEMM floor, and the saved-bytes ratio."""
    return [{"what": "fused linear cross-entropy fwd+bwd (LM head + loss)",
             "where": {"mode": "fwd+bwd"},
             "cells": [{"text": "{}x vs unfused (logits + F.cross_entropy)",
                        "values": [{"ratio": ["reference", "fastpeft"]}]},
                       {"text": "{}x the head-GEMM floor (head GEMMs at {} of this machine's GEMM throughput)",
                        "values": [{"ratio": ["fastpeft", "floor"]},
                                   {"value": "fastpeft", "metric": "base_tflops_of_roofline"}]},
                       {"text": "saves {}x fewer bytes for backward",
                        "values": [{"ratio": ["reference", "fastpeft"], "metric": "saved_bytes", "fmt": "{:.0f}"}]}]}]  # fmt: skip


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common.add_common_args(parser, threads=None).parse_args(argv)
    device, dtype = common.setup(args)
    preset = "quick" if args.quick else ("llama8b" if device.startswith("cuda") else "cpu")
    reps = args.reps or (10 if device.startswith("cuda") else 3)
    rows = []
    for N, H, V in SHAPES[preset]:
        h = (torch.randn(N, H, device=device) * 0.5).to(dtype).requires_grad_(True)
        w = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
        labels = torch.randint(0, V, (N,), device=device)
        fns = {
            "fastpeft": lambda: linear_cross_entropy(h, w, labels),
            "reference": lambda: linear_cross_entropy_reference(h, w, labels),
            "floor": lambda: F.linear(h, w).sum(),
        }
        runs = {name: common.runner(fn, "fwd+bwd", [h]) for name, fn in fns.items()}
        stats = common.time_interleaved(runs, device, warmup=1, reps=reps)
        case = f"t{N} h{H} v{V}"
        for name, fn in fns.items():
            saved = common.saved_activation_bytes(fn, exclude=(w,))
            peak = common.peak_memory_bytes(runs[name], device)
            # The head's two GEMMs (logits, and the hidden gradient), 2 flops per MAC.
            tflops = 4 * N * H * V / (stats[name]["median_ms"] * 1e-3) / 1e12
            rows.append(common.make_row("linear_cross_entropy", case, "fwd+bwd", dtype, name, stats[name],
                                        tokens=N, hidden=H, vocab=V, saved_bytes=saved, peak_bytes=peak,
                                        base_tflops=tflops))  # fmt: skip
            print(f"{case:>20s} {name:10s} {stats[name]['median_ms']:9.2f} ms  saved {saved / 2**20:8.1f} MiB"
                  + (f"  peak {peak / 2**20:8.1f} MiB" if peak is not None else ""), flush=True)  # fmt: skip
    columns = ["case", "provider", "median_ms", "saved_bytes", "peak_bytes"]
    return common.finish(args, device, f"bench_linear_cross_entropy_{preset}", "linear_cross_entropy", rows,
                         headline(), dict(preset=preset, reps=reps), columns)  # fmt: skip


if __name__ == "__main__":
    main()
