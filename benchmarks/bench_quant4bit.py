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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastpeft.ops import dequantize_4bit, dequantize_4bit_reference  # noqa: E402
from fastpeft.quant import Quant4bitWeight  # noqa: E402

SHAPES = {
    "llama8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
    "cpu": [(1024, 1024), (3584, 1024), (1024, 3584)],
    "quick": [(512, 512)],
}


def moved_bytes(qw: Quant4bitWeight, out_dtype: torch.dtype) -> int:
    n = qw.numel
    read = qw.packed.numel() + qw.absmax.numel() * qw.absmax.element_size()
    if qw.nested:
        read += qw.nested_absmax.numel() * 4 + 256 * 4
    return read + n * torch.empty((), dtype=out_dtype).element_size()


def main(argv=None):
    import bitsandbytes.functional as BF

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    preset = "quick" if args.quick else ("llama8b" if device.startswith("cuda") else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    peaks = common.device_peaks(device)
    reps = 20 if device.startswith("cuda") else 5

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
                    row = dict(shape=f"{shape[0]}x{shape[1]}", quant_type=quant_type, nested=nested,
                               dtype=str(dtype).replace("torch.", ""), provider=name, ms=t["median_ms"],
                               p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], gbps=nbytes / (t["median_ms"] * 1e-3) / 1e9)  # fmt: skip
                    if peaks:
                        row["pct_of_hbm"] = 100 * row["gbps"] / peaks["hbm_gbps"]
                    rows.append(row)
                    print(f"{row['shape']:>11s} {quant_type} nested={nested!s:5s} {name:12s} "
                          f"{row['ms']:.3f} ms  {row['gbps']:.1f} GB/s", flush=True)  # fmt: skip
    columns = ["shape", "quant_type", "nested", "provider", "ms", "gbps"] + (["pct_of_hbm"] if peaks else [])
    print()
    common.print_table(rows, columns)
    if not args.no_write:
        print("\nwrote", common.write_results(f"bench_quant4bit_{preset}", device, rows))


if __name__ == "__main__":
    main()
