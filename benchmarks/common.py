"""Shared benchmark helpers: timing, memory, device facts, weights and the one results schema.

Conventions (every bench_<family>.py follows them):
  * providers side by side in one run: ``fastpeft``, ``reference`` (plain PyTorch), the ecosystem
    peer (``peft``, ``bitsandbytes``, ``sdpa``, ``torch.optim``) and the bare frozen op as the floor;
  * median with 20th/80th percentiles of repeated runs after warm-up; CUDA events on GPU;
    providers timed interleaved (``time_interleaved``) so a shared machine's drift hits all alike;
  * memory: peak allocated bytes on CUDA; on CPU the bytes autograd saves for backward (exact);
    whole training steps through ``fastpeft.memory.measure_step`` (saved bytes and the peak, on
    the CPU from the profiler's memory timeline);
  * results to benchmarks/results/<device-slug>/<name>.json through ``write_results`` (``finish``
    at the end of a main prints the rows, writes them unless --no-write and returns them).

Results file (one schema for every benchmark; ``summarize.py`` reads any such file)::

    {"bench": "lora",                      # the family: bench_<family>.py
     "environment": {device, torch, cuda, commit, date, threads},
     "config": {...},                      # free: shapes, preset, reps, ...
     "headline": [...],                    # what the README table shows, as data (below)
     "rows": [...]}                        # one flat dict per (case, mode, dtype, provider)

Row: a flat dict with the core keys (``ROW_KEYS``)

    bench      the family, as in the file ("lora", "ia3", ...)
    case       a short human label of the shape / configuration ("dense 1024x3584 t512 r16");
               together with mode and dtype it names one measurement that every provider ran
    mode       one of MODES: "fwd" (no grad), "bwd" (backward after an untimed forward),
               "fwd+bwd", "step" (an optimizer or training step)
    dtype      the compute dtype without "torch." ("float32", "bfloat16")
    provider   "fastpeft", "reference" (plain PyTorch), "floor" (the bare frozen op), or the peer's /
               variant's name ("peft", "bitsandbytes", "sdpa", "loop", "dense_masked", ...)
    median_ms, p20_ms, p80_ms   wall time per run in ms; None only where the row could not be
               timed (then it says why under "error") or the bench measures no per-run time
               (then it says which metric it does measure, e.g. "tokens_per_s")

optional keys with fixed meaning: ``gbps`` (achieved GB/s), ``tflops`` (achieved TFLOP/s),
``<metric>_of_roofline`` (that throughput over this machine's measured limit, ``machine_roofline``:
triad bandwidth for GB/s, large-GEMM throughput for TFLOP/s; the limits are in environment.roofline),
``saved_bytes`` (bytes autograd saves for backward, CPU), ``peak_bytes`` (peak CUDA bytes above the
start; CPU rows measured with ``fastpeft.memory`` have it too, from the profiler), ``error``; any other key is free (shape numbers, ``base``, ``density``, ``max_abs_err_y``...).

Headline: a list of README table rows, each
``{"what": label, "where": {key: value or [values]}, "cells": [cell, cell, cell]}``; the three cells
fill the columns "fastpeft vs peer", "second comparison" and "note". A cell is
``{"text": "{}x vs peft", "values": [spec, ...]}``, each ``{}`` filled by one spec, evaluated over the
rows that match ``where``, paired by (case, mode, dtype), as a min..max range over the cases:

    {"ratio": [a, b], "metric": "median_ms", "fmt": "{:.2f}"}   row a's metric / row b's, per case
    {"value": a, "metric": "gbps", "fmt": "{:.1f}"}             provider a's metric itself

(metric defaults to median_ms, fmt to "{:.2f}"). A cell with no values is a fixed note; a cell whose
values find no rows reads "-". So ``{"ratio": ["peft", "fastpeft"]}`` is "peer time / fastpeft time"
(> 1: fastpeft faster) and ``{"ratio": ["fastpeft", "floor"]}`` is "x the floor".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Datasheet peaks (dense, no sparsity) for the devices this project is measured on.
DEVICE_PEAKS = {
    "H100": {"bf16_tflops": 989.0, "hbm_gbps": 3350.0},
    "H200": {"bf16_tflops": 989.0, "hbm_gbps": 4800.0},
}

ROW_KEYS = ("bench", "case", "mode", "dtype", "provider", "median_ms", "p20_ms", "p80_ms")
MODES = ("fwd", "bwd", "fwd+bwd", "step")
UNTIMED_METRICS = ("tokens_per_s",)  # what a row may measure instead of a per-run time


# ---------------------------------------------------------------------------------------------
# device facts


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name with its core count."""
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


_ROOFLINE = {}


def machine_roofline(device: str) -> dict:
    """This machine's limits, measured once per process on the threads the benchmark uses: memory
    bandwidth from a STREAM-style triad (``a = b + s * c`` over float32 arrays far larger than the
    caches; 12 bytes moved per element) and GEMM throughput from one large ``torch.mm`` (float32 on
    the CPU, bfloat16 on a GPU). Medians of repeated runs."""
    key = (device, torch.get_num_threads())
    if key in _ROOFLINE:
        return _ROOFLINE[key]
    gpu = device.startswith("cuda")
    n = (1 << 28) if gpu else (1 << 24)
    b, c = torch.rand(n, device=device), torch.rand(n, device=device)
    a = torch.empty_like(b)
    triad = time_fn(lambda: torch.add(b, c, alpha=1.5, out=a), device, warmup=2, reps=9)
    size, dtype = (8192, torch.bfloat16) if gpu else (2048, torch.float32)
    x, y = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    gemm = time_fn(lambda: torch.mm(x, y), device, warmup=2, reps=7)
    del a, b, c, x, y
    _ROOFLINE[key] = {
        "triad_gbps": 3 * 4 * n / (triad["median_ms"] * 1e-3) / 1e9,
        "gemm_tflops": 2 * size**3 / (gemm["median_ms"] * 1e-3) / 1e12,
        "gemm_dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
    }
    return _ROOFLINE[key]


# Row metrics and the roofline figure each is a fraction of ("<metric>_of_roofline" in the row).
# line_gbps: the bytes of every 64-byte cache line a kernel touches (gathers move whole lines), per second.
ROOFLINE_METRICS = {"gbps": "triad_gbps", "line_gbps": "triad_gbps", "tflops": "gemm_tflops",
                    "base_tflops": "gemm_tflops"}


def attach_roofline(rows: list, roofline: dict) -> None:
    """Add ``<metric>_of_roofline`` (achieved / this machine's limit) to every row reporting a
    throughput metric of ``ROOFLINE_METRICS``."""
    for row in rows:
        for metric, limit in ROOFLINE_METRICS.items():
            if isinstance(row.get(metric), (int, float)):
                row[f"{metric}_of_roofline"] = row[metric] / roofline[limit]


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (the results folder of a device)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def git_commit() -> str:
    """The short commit of this checkout, with "-dirty" when the work tree differs from it."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=root) != 0
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the ``dtype`` of a row."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# timing and memory


def once_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` in ms (CUDA events on GPU)."""
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


def stats_ms(times: Iterable[float]) -> dict:
    """{median_ms, p20_ms, p80_ms, reps} of a list of times in ms. The percentiles interpolate
    between measured times ("inclusive"), so they stay within them even for a handful of reps."""
    times = sorted(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "reps": len(times)}


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> dict:
    """Median and 20/80 percentiles of ``fn``'s wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return stats_ms([once_ms(fn, device) for _ in range(reps)])


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, warmup: int = 3, reps: int = 10) -> dict:
    """{name: {median_ms, p20_ms, p80_ms, reps}} for every provider in ``fns``.

    Every repetition runs each provider once, in rotating order: on shared CPU cores the machine's
    speed drifts by 2x over minutes, so timing one provider's repetitions back to back and then the
    next provider's compares different machines; interleaving puts all under the same conditions.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(once_ms(fns[name], device))
    return {name: stats_ms(ts) for name, ts in times.items()}


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


def runner(fn: Callable[[], torch.Tensor], mode: str, leaves: Iterable[torch.Tensor]) -> Callable[[], None]:
    """What one timed repetition runs: ``fn()`` under no_grad ("fwd"), or ``fn()`` and its backward
    with a fixed upstream gradient, the leaves' .grad cleared first ("fwd+bwd")."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn()

        return run
    leaves = list(leaves)
    g = torch.randn_like(fn())

    def run():
        for t in leaves:
            t.grad = None
        fn().backward(g)

    return run


# ---------------------------------------------------------------------------------------------
# layers the benches share


class OneLayer(nn.Module):
    """A model holding one layer as ``proj``: what peft's get_peft_model needs to wrap a lone layer."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, *args, **kwargs):
        return self.proj(*args, **kwargs)


def make_linear_base(kind: str, in_f: int, out_f: int, dtype, device, bias: bool = True) -> nn.Module:
    """A frozen ``nn.Linear`` ("dense") or its bitsandbytes NF4 double-quantized copy ("nf4"),
    quantized from the compute-dtype weight (as a bf16 checkpoint would be)."""
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype).requires_grad_(False)
    if kind == "dense":
        return lin
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)  # fmt: skip
    if bias:
        q.bias = nn.Parameter(lin.bias.data.clone().cpu(), requires_grad=False)
    return q.to(device)


# ---------------------------------------------------------------------------------------------
# command line


def add_common_args(parser: argparse.ArgumentParser, threads: Optional[int] = 1) -> argparse.ArgumentParser:
    """The options every bench takes: --device, --dtype, --reps, --threads, --quick, --no-write."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: the bench's)")
    parser.add_argument("--threads", type=int, default=threads,
                        help="CPU threads (torch.set_num_threads; 1 gives steadier numbers on shared cores)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    return parser


def setup(args: argparse.Namespace, seed: int = 0):
    """Apply --threads (CPU) and the seed; return (device, dtype) from --device and --dtype."""
    device = args.device
    if args.threads and not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    default = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, args.dtype) if args.dtype else default


# ---------------------------------------------------------------------------------------------
# rows and result files


def make_row(bench: str, case: str, mode: str, dtype, provider: str, stats: Optional[dict] = None, **extra) -> dict:
    """A row in the results schema: the core keys, the timing stats (median/p20/p80 ms, reps), extras."""
    row = dict(bench=bench, case=case, mode=mode, dtype=dtype if isinstance(dtype, str) else dtype_name(dtype),
               provider=provider, median_ms=None, p20_ms=None, p80_ms=None)  # fmt: skip
    row.update(stats or {})
    row.update(extra)
    return row


def check_rows(rows: list) -> None:
    """Raise ValueError unless every row follows the schema of this module's docstring."""
    seen = set()
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"row lacks {missing}: {r}")
        if r["mode"] not in MODES:
            raise ValueError(f"mode {r['mode']!r} is not one of {MODES}: {r}")
        for k in ("bench", "case", "dtype", "provider"):
            if not isinstance(r[k], str) or not r[k]:
                raise ValueError(f"{k} must be a non-empty string: {r}")
        times = [r[k] for k in ("median_ms", "p20_ms", "p80_ms")]
        if r["median_ms"] is None:
            if "error" not in r and not any(k in r for k in UNTIMED_METRICS):
                raise ValueError(f"an untimed row says why ('error') or what it measures instead: {r}")
        elif any(not isinstance(t, (int, float)) or t < 0 for t in times if t is not None):
            raise ValueError(f"times must be non-negative numbers: {r}")
        elif r["p20_ms"] is not None and not r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]:
            raise ValueError(f"p20 <= median <= p80 does not hold: {r}")
        key = (r["bench"], r["case"], r["mode"], r["dtype"], r["provider"])
        if key in seen:
            raise ValueError(f"two rows for {key}: case labels must tell configurations apart")
        seen.add(key)


def check_headline(headline: list) -> None:
    """Raise ValueError unless ``headline`` is a list of {what, where, cells} as documented above."""
    for h in headline:
        if not isinstance(h.get("what"), str) or not isinstance(h.get("where", {}), dict):
            raise ValueError(f"headline entry needs 'what' (str) and 'where' (dict): {h}")
        for cell in h.get("cells", []):
            specs = cell.get("values", [])
            if cell.get("text", "").count("{}") != len(specs):
                raise ValueError(f"cell text has not one {{}} per value: {cell}")
            for spec in specs:
                if ("ratio" in spec) == ("value" in spec):
                    raise ValueError(f"a value spec is either a ratio or a value: {spec}")


def environment(device: str) -> dict:
    """Device name, torch and CUDA versions, git commit, UTC date and CPU threads of this run."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def results_file(bench: str, rows: list, headline: list, env: dict, config: Optional[dict] = None) -> dict:
    """The results document (checked): bench, environment, config, headline, rows."""
    check_rows(rows)
    check_headline(headline)
    return {"bench": bench, "environment": env, "config": config or {}, "headline": headline, "rows": rows}


def write_results(name: str, device: str, bench: str, rows: list, headline: list, config: Optional[dict] = None,
                  roofline: Optional[dict] = None) -> str:  # fmt: skip
    """Check ``rows`` and ``headline`` against the schema and write them with this run's environment
    (and the machine's roofline, if measured) to results/<device-slug>/<name>.json (atomically);
    return the path."""
    env = environment(device)
    if roofline is not None:
        env["roofline"] = roofline
    data = results_file(bench, rows, headline, env, config)
    folder = os.path.join(RESULTS_DIR, slug(env["device"]))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def finish(args: argparse.Namespace, device: str, name: str, bench: str, rows: list, headline: list,
           config: Optional[dict] = None, columns: Optional[list] = None) -> list:
    """The end of every bench's main: measure this machine's roofline and put each row's throughput
    as a fraction of it (``attach_roofline``), print the rows, write results/<device>/<name>.json
    unless --no-write (``write_results``), return the rows."""
    roofline = machine_roofline(device)
    attach_roofline(rows, roofline)
    print(f"\nroofline: triad {roofline['triad_gbps']:.1f} GB/s, {roofline['gemm_dtype']} GEMM "
          f"{roofline['gemm_tflops'] * 1e3:.0f} GFLOP/s on {roofline['threads']} threads")
    print()
    print_table(rows, columns or TABLE_COLUMNS)
    if not args.no_write:
        print("\nwrote", write_results(name, device, bench, rows, headline, config, roofline))
    return rows


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


TABLE_COLUMNS = ["case", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "saved_bytes", "peak_bytes"]
