"""Interleaved timing: every repetition runs each provider once, in rotating order.

On shared CPU cores the machine's speed drifts by 2x over minutes (other jobs), so timing one
provider's repetitions back to back and then the next provider's compares different machines.
Interleaving puts every provider under the same conditions; the statistics are those of
common.time_fn (median and 20th/80th percentiles in milliseconds).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch

from benchmarks import common


def _once_ms(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, warmup: int = 3, reps: int = 10) -> dict:
    """{name: {median_ms, p20_ms, p80_ms, reps}} for every provider in ``fns``."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    common.synchronize(device)
    times = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(_once_ms(fns[name], device))
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3], "reps": reps}
    return out
