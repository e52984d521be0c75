"""4-bit dequantization: fastpeft's kernel vs bitsandbytes.functional.dequantize_4bit vs the PyTorch reference.

Bandwidth counts the bytes a dequantization must move: packed weight and absmax read, output
written. On GPU the achieved GB/s is shown next to the datasheet HBM bandwidth.

  python benchmarks/bench_quant4bit.py            # Llama-3-8B weight shapes on GPU, a quarter of them on CPU
  python benchmarks/bench_quant4bit.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

from fastpeft.ops import dequantize_4bit, dequantize_4bit_reference  # noqa: E402
from fastpeft.quant import Quant4bitWeight  # noqa: E402

SHAPES = {
    "llama8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
    "cpu": [(1024, 1024), (3584, 1024), (1024, 3584)],
    "quick": [(512, 512)],
}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def headline(dtype):
    """The README row: achieved GB/s of fastpeft's and of bitsandbytes' dequantization, over the cases."""
    return [{"what": f"dequantize 4-bit (nf4/fp4, nested or not), {SHORT_DTYPE.get(dtype, dtype)} out",
             "where": {"mode": "fwd"},
             "cells": [{"text": "{}x bitsandbytes' speed (fastpeft {} GB/s)",
                        "values": [{"ratio": ["bitsandbytes", "fastpeft"]},
                                   {"value": "fastpeft", "metric": "gbps", "fmt": "{:.1f}"}]},
                       {"text": "bitsandbytes {} GB/s",
                        "values": [{"value": "bitsandbytes", "metric": "gbps", "fmt": "{:.1f}"}]},
                       {"text": "bit-exact with bitsandbytes; fastpeft at {} of this machine's DRAM triad bandwidth "
                                "(above 1: the output stays in cache)",
                        "values": [{"value": "fastpeft", "metric": "gbps_of_roofline"}]}]}]  # fmt: skip


def moved_bytes(qw: Quant4bitWeight, out_dtype: torch.dtype) -> int:
    n = qw.numel
    read = qw.packed.numel() + qw.absmax.numel() * qw.absmax.element_size()
    if qw.nested:
        read += qw.nested_absmax.numel() * 4 + 256 * 4
    return read + n * torch.empty((), dtype=out_dtype).element_size()


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    import bitsandbytes.functional as BF

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common.add_common_args(parser, threads=None).parse_args(argv)
    device, dtype = common.setup(args)
    preset = "quick" if args.quick else ("llama8b" if device.startswith("cuda") else "cpu")
    peaks = common.device_peaks(device)
    reps = args.reps or (20 if device.startswith("cuda") else 5)

    rows = []
    for shape in SHAPES[preset]:
        for quant_type in ("nf4", "fp4"):
            for nested in (True, False):
                w = torch.randn(shape, dtype=dtype, device=device)
                packed, state = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
                qw = Quant4bitWeight.from_bnb(packed, state)
                out = torch.empty(shape, dtype=dtype, device=device)
                candidates = {
                    "fastpeft": lambda: dequantize_4bit(qw, out=out),
                    "bitsandbytes": lambda: BF.dequantize_4bit(packed, state),
                    "reference": lambda: dequantize_4bit_reference(qw, dtype),
                }
                nbytes = moved_bytes(qw, dtype)
                for name, fn in candidates.items():
                    t = common.time_fn(fn, device, warmup=2, reps=reps)
                    case = f"{shape[0]}x{shape[1]} {quant_type}{' nested' if nested else ''}"
                    row = common.make_row("quant4bit", case, "fwd", dtype, name, t, shape=f"{shape[0]}x{shape[1]}",
                                          quant_type=quant_type, nested=nested,
                                          gbps=nbytes / (t["median_ms"] * 1e-3) / 1e9)  # fmt: skip
                    if peaks:
                        row["pct_of_hbm"] = 100 * row["gbps"] / peaks["hbm_gbps"]
                    rows.append(row)
                    print(f"{row['shape']:>11s} {quant_type} nested={nested!s:5s} {name:12s} "
                          f"{row['median_ms']:.3f} ms  {row['gbps']:.1f} GB/s", flush=True)  # fmt: skip
    columns = ["case", "provider", "median_ms", "gbps"] + (["pct_of_hbm"] if peaks else [])
    return common.finish(args, device, f"bench_quant4bit_{preset}", "quant4bit", rows,
                         headline(common.dtype_name(dtype)), dict(preset=preset, reps=reps), columns)  # fmt: skip


if __name__ == "__main__":
    main()
