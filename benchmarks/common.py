"""Shared benchmark helpers: timing, memory, device facts and result files.

Conventions (every bench_<family>.py follows them):
  * providers side by side in one run: ``fastpeft``, ``reference`` (plain PyTorch), the ecosystem
    peer (``peft``, ``bitsandbytes``, ``sdpa``, ``torch.optim``) and the bare frozen op as the floor;
  * median with 20th/80th percentiles of repeated runs after warm-up; CUDA events on GPU;
  * memory: peak allocated bytes on CUDA; on CPU the bytes autograd saves for backward (exact);
  * results to benchmarks/results/<device-slug>/<bench>.json with device, versions, commit, date.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Datasheet peaks (dense, no sparsity) for the devices this project is measured on.
DEVICE_PEAKS = {
    "H100": {"bf16_tflops": 989.0, "hbm_gbps": 3350.0},
    "H200": {"bf16_tflops": 989.0, "hbm_gbps": 4800.0},
}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_peaks(device: str) -> Optional[dict]:
    """Datasheet bf16 TFLOP/s and HBM GB/s of a known GPU, else None (CPUs: unknown)."""
    if not device.startswith("cuda"):
        return None
    name = device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=root) != 0
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> dict:
    """Median and 20/80 percentiles of ``fn``'s wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "reps": reps}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_activation_bytes(fn: Callable[[], object], exclude: tuple = ()) -> int:
    """Bytes autograd saves for backward while ``fn`` runs, counting each storage once and
    skipping storages of the tensors in ``exclude`` (parameters and frozen weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def environment(device: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def write_results(bench: str, device: str, rows: list, extra: Optional[dict] = None) -> str:
    """Write rows with the environment to results/<device-slug>/<bench>.json (atomically)."""
    env = environment(device)
    folder = os.path.join(RESULTS_DIR, slug(env["device"]))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{bench}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, **(extra or {}), "rows": rows}, f, indent=1)
    os.replace(tmp, path)
    return path


def print_table(rows: list, columns: list) -> None:
    """Print rows (dicts) as an aligned text table of the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
