"""LoRA linear: fastpeft vs HF peft vs the plain-PyTorch reference vs the bare frozen linear; and
DoRA (use_dora=True) on fastpeft's fused op vs peft's DoRA layer, without and with lora_dropout
(the -drop providers: the dropout mask regenerated from a seed, fastpeft's dropout_apply ops).

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

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
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DORA_DROPOUT = 0.1  # the -drop rows: DoRA with lora_dropout, fastpeft's dropout_apply pieces in the step


def headline(kinds, dtype, dora=True):
    """The README rows: per base kind, fwd+bwd time against peft and against the frozen-linear floor."""
    return [{"what": f"LoRA linear fwd+bwd, {'NF4' if kind == 'nf4' else kind} base, {SHORT_DTYPE.get(dtype, dtype)}",
             "where": {"mode": "fwd+bwd", "base": kind},
             "cells": [{"text": "{}x vs peft", "values": [{"ratio": ["peft", "fastpeft"]}]},
                       {"text": "{}x the frozen-linear floor", "values": [{"ratio": ["fastpeft", "floor"]}]},
                       {"text": "saved bytes = peft's without dropout (x + tokens x r); base GEMMs at {} of this "
                                "machine's GEMM throughput",
                        "values": [{"value": "fastpeft", "metric": "base_tflops_of_roofline"}]}]}
            for kind in kinds] + [
            {"what": f"DoRA linear fwd+bwd, {'NF4' if kind == 'nf4' else kind} base, {SHORT_DTYPE.get(dtype, dtype)}",
             "where": {"mode": "fwd+bwd", "base": kind},
             "cells": [{"text": "{}x vs peft's DoRA", "values": [{"ratio": ["peft-dora", "fastpeft-dora"]}]},
                       {"text": "{}x fastpeft's LoRA (target <= 1.25)", "values": [{"ratio": ["fastpeft-dora", "fastpeft"]}]},
                       {"text": f"with lora_dropout {DORA_DROPOUT}: " + "{}x vs peft's DoRA",
                        "values": [{"ratio": ["peft-dora-drop", "fastpeft-dora-drop"]}]}]}
            for kind in kinds if dora]  # fmt: skip


def make_base(kind, in_f, out_f, dtype, device):
    return common.make_linear_base(kind, in_f, out_f, dtype, device, bias=False)


def dora_providers(kind, base, r, like, dropout=0.0):
    """fastpeft's and peft's DoRA layers from the same weights (``like``: the LoRA layer to copy A, B
    from), in training mode; with ``dropout`` > 0 the names end in ``-drop``."""
    suffix = "-drop" if dropout > 0 else ""
    ours = LoRALinear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True).train()
    with torch.no_grad():
        ours.lora_A.weight.copy_(like.lora_A.weight)
        ours.lora_B.weight.copy_(like.lora_B.weight)
    out = {f"fastpeft-dora{suffix}": (ours, [ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector],
                                      list(ours.base_layer.parameters()))}  # fmt: skip
    try:
        import peft

        wrapper = common.OneLayer(copy.deepcopy(base))
        wrapper.is_loaded_in_4bit = kind != "dense"
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], use_dora=True)
        layer = peft.get_peft_model(wrapper, config).base_model.model.proj.train()
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
            layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        trainable = [p for p in layer.parameters() if p.requires_grad]
        out[f"peft-dora{suffix}"] = (layer, trainable, [p for p in layer.parameters() if not p.requires_grad])
    except ImportError:
        pass
    return out


def providers(kind, base, r, dtype, dora=True):
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

        wrapper = common.OneLayer(copy.deepcopy(base))
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
    if dora:
        out.update(dora_providers(kind, base, r, ours))
        out.update(dora_providers(kind, base, r, ours, DORA_DROPOUT))
    return out


def measure(providers: dict, x, grad, device, reps):
    """{provider: {mode: stats}} for fwd, bwd (after an untimed forward) and fwd+bwd, the providers
    timed interleaved (``common.time_interleaved``) so the shared machine's drift hits all alike;
    saved and peak bytes on fwd+bwd."""

    def forward(fn):
        return lambda: fn(x)

    def both(fn):
        def run():
            fn(x).backward(grad)

        return run

    out = {name: {} for name in providers}
    for mode, make, warmup in (("fwd", forward, 2), ("fwd+bwd", both, 1)):
        stats = common.time_interleaved({n: make(p[0]) for n, p in providers.items()}, device, warmup=warmup, reps=reps)
        for name, st in stats.items():
            out[name][mode] = st
    for name, (fn, _, _) in providers.items():  # bwd alone: one forward, then timed backward passes
        bwd_times = []
        for _ in range(reps):
            y = fn(x)
            common.synchronize(device)
            bwd_times.append(common.once_ms(lambda: y.backward(grad), device))
        out[name]["bwd"] = common.stats_ms(bwd_times)
    for name, (fn, trainable, frozen) in providers.items():
        out[name]["fwd+bwd"]["saved_bytes"] = common.saved_activation_bytes(lambda: fn(x),
                                                                            exclude=tuple(trainable) + tuple(frozen))  # fmt: skip
        out[name]["fwd+bwd"]["peak_bytes"] = common.peak_memory_bytes(both(fn), device)
        for p in trainable:
            p.grad = None
    x.grad = None
    return out


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: llama8b on GPU, cpu on CPU")
    parser.add_argument("--kinds", default="dense,nf4")
    parser.add_argument("--no-dora", action="store_true", help="leave out the DoRA rows")
    args = common.add_common_args(parser, threads=None).parse_args(argv)
    preset = "quick" if args.quick else (args.preset or ("llama8b" if args.device.startswith("cuda") else "cpu"))
    cfg = PRESETS[preset]
    device, _ = common.setup(args)
    dtype_str = args.dtype or cfg["dtype"]
    dtype = getattr(torch, dtype_str)
    reps = args.reps or (3 if preset == "quick" else 10 if device.startswith("cuda") else 5)
    kinds = args.kinds.split(",")

    rows = []
    for kind in kinds:
        for in_f, out_f in cfg["shapes"]:
            for tokens in cfg["tokens"]:
                for r in cfg["ranks"]:
                    torch.manual_seed(0)
                    base = make_base(kind, in_f, out_f, dtype, device)
                    x = torch.randn(tokens, in_f, dtype=dtype, device=device, requires_grad=True)
                    grad = torch.randn(tokens, out_f, dtype=dtype, device=device)
                    case = f"{kind} {in_f}x{out_f} t{tokens} r{r}"
                    measured = measure(providers(kind, base, r, dtype, not args.no_dora), x, grad, device, reps)
                    for name, by_mode in measured.items():
                        for mode, st in by_mode.items():
                            row = common.make_row("lora", case, mode, dtype, name, st, base=kind, in_f=in_f,
                                                  out_f=out_f, tokens=tokens, r=r)  # fmt: skip
                            if mode == "fwd+bwd":
                                # The frozen GEMMs every provider runs: forward and input gradient, 2 flops per MAC.
                                row["base_tflops"] = 4 * tokens * in_f * out_f / (st["median_ms"] * 1e-3) / 1e12
                            rows.append(row)
                        print(f"{case} {name:13s} " + "  ".join(f"{row['mode']} {row['median_ms']:.2f} ms" for row in rows[-3:]),
                              flush=True)  # fmt: skip

    config = dict(preset=preset, reps=reps, **cfg)
    return common.finish(args, device, f"bench_lora_{preset}", "lora", rows, headline(kinds, dtype_str, not args.no_dora), config)


if __name__ == "__main__":
    main()
