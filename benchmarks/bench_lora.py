"""LoRA linear: fastpeft vs HF peft vs the plain-PyTorch reference vs the bare frozen linear.

The floor is the frozen layer alone (forward + input gradient), what any LoRA layer must pay.
Times are medians (p20/p80 in the JSON) of forward, backward (after an untimed forward) and both.
Memory: peak CUDA bytes on GPU; bytes saved for backward on CPU (exact).

  python benchmarks/bench_lora.py                       # CPU-sized shapes, fp32, dense + nf4
  python benchmarks/bench_lora.py --preset llama8b      # Llama-3-8B projections, 2k-16k tokens, bf16
  python benchmarks/bench_lora.py --quick               # seconds; for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastpeft  # noqa: E402,F401
from fastpeft.nn import LoRALinear  # noqa: E402
from fastpeft.ops import lora_linear_reference  # noqa: E402

PRESETS = {
    # (in_features, out_features) of Llama-3-8B's projections
    "llama8b": dict(shapes=[(4096, 4096), (4096, 14336), (14336, 4096)], tokens=[2048, 8192, 16384], ranks=[16, 64],
                    dtype="bfloat16"),  # fmt: skip
    # the same aspect ratios at a quarter of the width: minutes, not hours, on a 2-core CPU
    "cpu": dict(shapes=[(1024, 1024), (1024, 3584), (3584, 1024)], tokens=[512], ranks=[16, 64], dtype="float32"),
    "quick": dict(shapes=[(256, 512)], tokens=[128], ranks=[16], dtype="float32"),
}


class OneLayer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def make_base(kind, in_f, out_f, dtype, device):
    dense = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    if kind == "dense":
        return dense.to(device)
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.float(), requires_grad=False, quant_type="nf4", blocksize=64)
    return layer.to(device)


def providers(kind, base, r, dtype):
    """name -> (module or callable on x, trainable parameters, frozen tensors)."""
    out = {}
    base.requires_grad_(False)
    out["floor"] = (base, [], list(base.parameters()))

    # Both libraries as users get them by default: float32 adapters on a low-precision base.
    ours = LoRALinear(copy.deepcopy(base), r=r, lora_alpha=2 * r)
    nn.init.normal_(ours.lora_B.weight, std=0.01)
    out["fastpeft"] = (ours, [ours.lora_A.weight, ours.lora_B.weight], list(ours.base_layer.parameters()))

    try:
        import peft

        wrapper = OneLayer(copy.deepcopy(base))
        wrapper.is_loaded_in_4bit = kind != "dense"
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])
        layer = peft.get_peft_model(wrapper, config).base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
            layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        trainable = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        out["peft"] = (layer, trainable, [p for p in layer.parameters() if not p.requires_grad])
    except ImportError:
        pass

    if kind == "dense":
        A, B = ours.lora_A.weight, ours.lora_B.weight
        W = ours.base_layer.weight
        ref = lambda x: lora_linear_reference(x, W, None, A.to(dtype), B.to(dtype), ours.scaling)  # noqa: E731
        out["reference"] = (ref, [A, B], [ours.base_layer.weight])
    return out


def measure(fn, trainable, frozen, x, grad, device, reps):
    def forward():
        return fn(x)

    def both():
        y = fn(x)
        y.backward(grad)

    fwd = common.time_fn(forward, device, warmup=2, reps=reps)
    both_t = common.time_fn(both, device, warmup=1, reps=reps)
    # backward alone: forward untimed each rep
    bwd_times = []
    for _ in range(reps):
        y = fn(x)
        common.synchronize(device)
        t = common.time_fn(lambda: y.backward(grad, retain_graph=True), device, warmup=0, reps=1)
        bwd_times.append(t["median_ms"])
    bwd_times.sort()
    row = {
        "fwd_ms": fwd["median_ms"], "fwd_p20_ms": fwd["p20_ms"], "fwd_p80_ms": fwd["p80_ms"],
        "bwd_ms": bwd_times[len(bwd_times) // 2],
        "both_ms": both_t["median_ms"], "both_p20_ms": both_t["p20_ms"], "both_p80_ms": both_t["p80_ms"],
    }  # fmt: skip
    row["saved_bytes"] = common.saved_activation_bytes(forward, exclude=tuple(trainable) + tuple(frozen))
    row["peak_bytes"] = common.peak_memory_bytes(both, device)
    for p in trainable:
        p.grad = None
    x.grad = None
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: llama8b on GPU, cpu on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default="dense,nf4")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else (args.preset or ("llama8b" if args.device.startswith("cuda") else "cpu"))
    cfg = PRESETS[preset]
    dtype = getattr(torch, cfg["dtype"])
    reps = args.reps or (3 if preset == "quick" else 10 if args.device.startswith("cuda") else 5)
    device = args.device

    rows = []
    for kind in args.kinds.split(","):
        for in_f, out_f in cfg["shapes"]:
            for tokens in cfg["tokens"]:
                for r in cfg["ranks"]:
                    torch.manual_seed(0)
                    base = make_base(kind, in_f, out_f, dtype, device)
                    x = torch.randn(tokens, in_f, dtype=dtype, device=device, requires_grad=True)
                    grad = torch.randn(tokens, out_f, dtype=dtype, device=device)
                    for name, (fn, trainable, frozen) in providers(kind, base, r, dtype).items():
                        row = dict(kind=kind, in_f=in_f, out_f=out_f, tokens=tokens, r=r, dtype=cfg["dtype"],
                                   provider=name)  # fmt: skip
                        row.update(measure(fn, trainable, frozen, x, grad, device, reps))
                        # The frozen GEMMs every provider runs: forward and input gradient, 2 flops per MAC.
                        row["base_tflops"] = 4 * tokens * in_f * out_f / (row["both_ms"] * 1e-3) / 1e12
                        rows.append(row)
                        print(f"{kind:5s} {in_f}x{out_f} tokens={tokens} r={r} {name:9s} "
                              f"fwd {row['fwd_ms']:.2f} ms  bwd {row['bwd_ms']:.2f} ms  both {row['both_ms']:.2f} ms",
                              flush=True)  # fmt: skip

    summary = summarize(rows)
    print()
    common.print_table(summary, ["kind", "in_f", "out_f", "tokens", "r", "fastpeft_ms", "floor_ms", "peft_ms",
                                 "vs_floor", "peft_speedup", "nf4_vs_dense", "saved_MiB_fastpeft",
                                 "saved_MiB_peft"])  # fmt: skip
    if not args.no_write:
        path = common.write_results(f"bench_lora_{preset}", device, rows, extra={"summary": summary})
        print(f"\nwrote {path}")
    return rows, summary


def summarize(rows):
    """Per configuration: fastpeft's fwd+bwd time against the floor and against peft."""
    by_cfg = {}
    for row in rows:
        key = (row["kind"], row["in_f"], row["out_f"], row["tokens"], row["r"])
        by_cfg.setdefault(key, {})[row["provider"]] = row
    summary = []
    for (kind, in_f, out_f, tokens, r), p in by_cfg.items():
        ours, floor, peft_row = p.get("fastpeft"), p.get("floor"), p.get("peft")
        s = dict(kind=kind, in_f=in_f, out_f=out_f, tokens=tokens, r=r,
                 fastpeft_ms=ours["both_ms"], floor_ms=floor["both_ms"],
                 vs_floor=ours["both_ms"] / floor["both_ms"],
                 saved_MiB_fastpeft=ours["saved_bytes"] / 2**20)  # fmt: skip
        if peft_row:
            s.update(peft_ms=peft_row["both_ms"], peft_speedup=peft_row["both_ms"] / ours["both_ms"],
                     saved_MiB_peft=peft_row["saved_bytes"] / 2**20)  # fmt: skip
        if ours.get("peak_bytes") is not None:
            s["peak_MiB_fastpeft"] = ours["peak_bytes"] / 2**20
            if peft_row:
                s["peak_MiB_peft"] = peft_row["peak_bytes"] / 2**20
        dense = by_cfg.get(("dense", in_f, out_f, tokens, r), {}).get("fastpeft")
        if kind != "dense" and dense:
            s["nf4_vs_dense"] = ours["both_ms"] / dense["both_ms"]
        summary.append(s)
    return summary


if __name__ == "__main__":
    main()
