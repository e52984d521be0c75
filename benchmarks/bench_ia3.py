"""(IA)^3 benchmark: fastpeft vs the plain-PyTorch reference vs HF peft vs the bare frozen op.

Cases:
  scale        the scaling kernel alone (x * l[task]) on [M, d]; floor: a copy of x (same bytes)
  linear-out   k/v projection, y = (x W^T + b) * l; floor: the bare linear
  linear-ff    FFN down projection, y = (x * l) W^T + b; floor: the bare linear
each with one task and with a bank of T tasks (per-example task ids; peft has no mixed-task batch),
on dense and bitsandbytes NF4 bases. Forward (no grad) and forward+backward (x and l need grad).
Reports median / p20 / p80 ms, achieved GB/s for the scaling kernel next to the device's peak, and
the bytes autograd saves for backward (CPU) or peak memory (CUDA).

  python benchmarks/bench_ia3.py                 # CPU-scaled shapes
  python benchmarks/bench_ia3.py --gpu-shapes    # Llama-3-8B shapes from the issue (needs a GPU)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from fastpeft.nn import IA3Linear  # noqa: E402
from fastpeft.ops import ia3_linear_reference, ia3_scale, ia3_scale_reference  # noqa: E402
from fastpeft.quant import Quant4bitWeight  # noqa: E402

CPU_SHAPES = dict(tokens=1024, seq=128, hidden=1024, kv_out=256, intermediate=2816, tasks=16)
GPU_SHAPES = dict(tokens=8192, seq=512, hidden=4096, kv_out=1024, intermediate=14336, tasks=256)
QUICK_SHAPES = dict(tokens=64, seq=16, hidden=64, kv_out=32, intermediate=96, tasks=4)


def headline(tasks):
    """The README rows: per layer kind, fwd+bwd time against peft and against the base GEMM."""
    return [{"what": f"(IA)^3 {kind} fwd+bwd (dense and NF4 bases, 1 and {tasks} tasks)",
             "where": {"mode": "fwd+bwd", "kind": kind},
             "cells": [{"text": "{}x vs peft", "values": [{"ratio": ["peft", "fastpeft"]}]},
                       {"text": "{}x the base-GEMM floor", "values": [{"ratio": ["fastpeft", "floor"]}]},
                       {"text": ""}]}
            for kind in ("linear-out", "linear-ff")] + [
            {"what": f"(IA)^3 scaling alone (ia3_scale, 1 and {tasks} tasks)", "where": {"mode": "fwd+bwd", "kind": "scale"},
             "cells": [{"text": "{}x vs the PyTorch reference", "values": [{"ratio": ["reference", "fastpeft"]}]},
                       {"text": "{}x the copy floor", "values": [{"ratio": ["fastpeft", "floor"]}]},
                       {"text": "at {} of this machine's triad bandwidth",
                        "values": [{"value": "fastpeft", "metric": "gbps_of_roofline"}]}]}]  # fmt: skip


def peft_layer(base, is_ff, is_4bit):
    from peft import IA3Config
    from peft.tuners.ia3 import Linear as PeftIA3Linear

    config = IA3Config(target_modules=["x"], feedforward_modules=["x"] if is_ff else [])
    if is_4bit:
        from peft.tuners.ia3.bnb import Linear4bit as PeftIA3Linear4bit

        return PeftIA3Linear4bit(base, "default", config, is_feedforward=is_ff)
    return PeftIA3Linear(base, "default", config, is_feedforward=is_ff)


def bench(providers, device, mode, leaves, reps):
    """Interleaved timing of every provider ({name: fn}), plus peak CUDA memory per provider."""
    runs = {name: common.runner(fn, mode, leaves + extra) for name, (fn, extra) in providers.items()}
    stats = common.time_interleaved(runs, device, warmup=2, reps=reps)
    for name, run in runs.items():
        stats[name]["peak_bytes"] = common.peak_memory_bytes(run, device)
    return stats


def scale_rows(shapes, dtype, device, reps):
    rows = []
    M, d, T = shapes["tokens"], shapes["hidden"], shapes["tasks"]
    B = M // shapes["seq"]
    peaks = common.device_peaks(device)
    for tasks in (1, T):
        x = torch.randn(B, shapes["seq"], d, dtype=dtype, device=device, requires_grad=True)
        v = (1 + 0.1 * torch.randn(tasks, d, device=device)).requires_grad_(True)
        ids = torch.randint(0, tasks, (B,), device=device) if tasks > 1 else None
        providers = {
            "fastpeft": (lambda: ia3_scale(x, v, ids), []),
            "reference": (lambda: ia3_scale_reference(x, v, ids), []),
            "floor": (lambda: x.clone(), []),  # the same bytes read and written
        }
        for mode in ("fwd", "fwd+bwd"):
            stats = bench(providers, device, mode, [x, v], reps)
            for name, st in stats.items():
                moved = 2 * x.numel() * x.element_size() * (1 if mode == "fwd" else 3)  # bwd reads g, x; writes gx
                gbps = moved / (st["median_ms"] * 1e-3) / 1e9
                rows.append(common.make_row("ia3", f"scale T{tasks}", mode, dtype, name, st, kind="scale", base="-",
                                            tasks=tasks, M=M, d=d, gbps=gbps,
                                            peak_gbps=peaks["hbm_gbps"] if peaks else None))  # fmt: skip
    return rows


def linear_rows(shapes, dtype, device, reps, kinds):
    rows = []
    M, T, S = shapes["tokens"], shapes["tasks"], shapes["seq"]
    B = M // S
    for kind in kinds:
        for side, in_f, out_f in (("out", shapes["hidden"], shapes["kv_out"]), ("ff", shapes["intermediate"], shapes["hidden"])):
            is_ff = side == "ff"
            base = common.make_linear_base(kind, in_f, out_f, dtype, device)
            x = torch.randn(B, S, in_f, dtype=dtype, device=device, requires_grad=True)
            for tasks in (1, T):
                layer = IA3Linear(base, is_ff, num_tasks=None if tasks == 1 else tasks)
                with torch.no_grad():
                    layer.ia3_l.copy_(1 + 0.1 * torch.randn_like(layer.ia3_l))
                ids = torch.randint(0, tasks, (B,), device=device) if tasks > 1 else None
                weight = Quant4bitWeight.from_bnb(base.weight) if kind != "dense" else base.weight
                providers = {
                    "fastpeft": (lambda: layer(x, ids), []),
                    "reference": (lambda: ia3_linear_reference(x, weight, base.bias, layer.vectors, ids, is_ff), []),
                    "floor": (lambda: base(x), []),
                }
                if tasks == 1:
                    pl = peft_layer(base, is_ff, kind != "dense")
                    with torch.no_grad():
                        pl.ia3_l["default"].copy_(layer.ia3_l)
                    providers["peft"] = (lambda: pl(x), [pl.ia3_l["default"]])
                for mode in ("fwd", "fwd+bwd"):
                    stats = bench(providers, device, mode, [x, layer.ia3_l], reps)
                    for name, st in stats.items():
                        saved = None
                        if mode == "fwd+bwd" and not device.startswith("cuda"):
                            exclude = tuple(p for p in (*base.parameters(), layer.ia3_l, *providers[name][1]))
                            saved = common.saved_activation_bytes(providers[name][0], exclude=exclude)
                        rows.append(common.make_row("ia3", f"linear-{side} {kind} T{tasks}", mode, dtype, name, st,
                                                    kind=f"linear-{side}", base=kind, tasks=tasks, M=M, in_f=in_f,
                                                    out_f=out_f, saved_bytes=saved))  # fmt: skip
    return rows


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-shapes", action="store_true", help="the issue's Llama-3-8B shapes")
    parser.add_argument("--no-4bit", action="store_true")
    args = common.add_common_args(parser).parse_args(argv)
    device, dtype = common.setup(args)
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.gpu_shapes else CPU_SHAPES
    reps = args.reps or (50 if device.startswith("cuda") else 10)
    kinds = ["dense"] + ([] if args.no_4bit else ["nf4"])
    rows = scale_rows(shapes, dtype, device, reps) + linear_rows(shapes, dtype, device, reps, kinds)
    name = "bench_ia3" + ("_quick" if args.quick else "_gpu_shapes" if args.gpu_shapes else "")
    config = dict(shapes=shapes, reps=reps, threads=args.threads)
    return common.finish(args, device, name, "ia3", rows, headline(shapes["tasks"]), config,
                         columns=common.TABLE_COLUMNS + ["gbps"])  # fmt: skip


if __name__ == "__main__":
    main()
