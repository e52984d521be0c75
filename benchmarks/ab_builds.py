"""A/B timing of two checkouts of fastpeft (e.g. before and after a refactor), interleaved.

Two builds of the extension cannot live in one process (they register the same operators), so this
runs one worker process per checkout per round, alternating A, B, A, B ... ; each worker times the
same layer-level workloads (fwd+bwd through the public API only, so any two versions run them) and
prints one JSON line. The report gives, per workload, the median over rounds of each worker's
median, and B / A.

    python benchmarks/ab_builds.py /path/to/checkout_A /path/to/checkout_B --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _workloads():
    import torch
    from torch import nn

    from fastpeft.nn import IA3Linear, LoRALinear

    def linear4bit(i, o):
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=True)  # fmt: skip
        layer.weight = bnb.nn.Params4bit(torch.randn(o, i) * 0.02, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)  # fmt: skip
        return layer.to("cpu")

    out = {}
    tokens = 512
    for kind in ("dense", "nf4"):
        for i, o, r in ((384, 1536, 16), (1024, 1024, 64)):
            base = nn.Linear(i, o, bias=False) if kind == "dense" else linear4bit(i, o)
            layer = LoRALinear(base, r=r, lora_alpha=2 * r)
            x = torch.randn(tokens, i, requires_grad=True)
            out[f"lora {kind} {i}x{o} r{r}"] = (layer, x)
        for ff in (False, True):
            base = nn.Linear(384, 1536, bias=False) if kind == "dense" else linear4bit(384, 1536)
            layer = IA3Linear(base, is_feedforward=ff)
            x = torch.randn(tokens, 384, requires_grad=True)
            out[f"ia3 {kind} {'ff' if ff else 'out'} 384x1536"] = (layer, x)
    return out


def worker(reps: int) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    result = {}
    for name, (layer, x) in _workloads().items():
        def step():
            layer(x).sum().backward()

        for _ in range(3):
            step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        result[name] = statistics.median(times)
    print(json.dumps(result))


def main(argv=None) -> int:
    """Run the workers alternately against two checkouts and print medians and B / A per workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="checkout A (its fastpeft/_C must be built)")
    p.add_argument("b", help="checkout B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.reps)
        return 0
    runs = {"A": [], "B": []}
    for rnd in range(args.rounds):
        for label in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            root = os.path.abspath(args.a if label == "A" else args.b)
            env = dict(os.environ, PYTHONPATH=root)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), args.a, args.b, "--worker",
                                   "--reps", str(args.reps)], env=env, cwd=root, capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                return 1
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} rounds alternating A/B, median of {args.reps} reps each (ms)\n")
    print(f"| workload (fwd+bwd, {os.cpu_count()} CPU threads) | A ms | B ms | B / A |")
    print("| --- | --- | --- | --- |")
    for name in runs["A"][0]:
        a = statistics.median(r[name] for r in runs["A"])
        b = statistics.median(r[name] for r in runs["B"])
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
