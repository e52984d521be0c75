"""Several LoRA adapters in one batch: fastpeft vs peft's adapter_names vs a Python loop vs the base layer.

Every example of a [examples, seq, hidden] batch names one adapter of a bank with mixed ranks.
Providers, side by side on the same weights and routing:
  fastpeft  MultiLoRALinear: base GEMM once, segment GEMMs per adapter, no Python loop; the routing
            plan is made once per batch (untimed here, its time is the `plan` row), as in a model
            where every layer shares it
  fastpeft+plan  the same, making the plan inside every call (a lone layer given an index tensor)
  fastpeft[P]  fastpeft with its path forced (FASTPEFT_MULTI_LORA_PATH=P: segment, grouped, bgmv;
            bgmv is CUDA forward only): the rows that place the path thresholds in
            csrc/multi_lora/multi_lora_path.cpp (on the CPU, grouped is ATen's per-group loop)
  peft      peft's LoRA layer with adapter_names=[...] (inference only: peft refuses it in training)
  loop      the naive reference: base GEMM, then a Python loop over adapters gathering their rows
  floor     the frozen base layer alone (forward; forward + input gradient in training)
Modes: fwd (inference: forward under no_grad) and fwd+bwd (training: forward + backward into x and every adapter).
Times: median with p20/p80, providers timed in turn within each round; memory: peak CUDA bytes on GPU, bytes saved for backward on CPU.

  python benchmarks/bench_multi_lora.py                 # CPU-sized shapes, fp32
  python benchmarks/bench_multi_lora.py --preset gpu    # hidden 4096, 8..64 adapters, ranks 8..64, 1k..16k tokens, bf16
  python benchmarks/bench_multi_lora.py --quick         # seconds; a smoke run
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
from fastpeft.nn import MultiLoRALinear  # noqa: E402
from fastpeft.ops import multi_lora_linear_reference, plan_multi_lora  # noqa: E402

RANK_CYCLE = [8, 16, 32, 64]  # adapter i has rank RANK_CYCLE[i % 4]: mixed ranks in every batch

PRESETS = {
    # hidden 4096 (Llama-3-8B's q/o projections), prefill-sized batches of 1k..16k tokens in
    # examples of 256 tokens, and a decode-like batch (one token per example, 64 examples).
    "gpu": dict(hidden=4096, adapters=[8, 32, 64], tokens=[1024, 4096, 16384], seq=256, decode=64, dtype="bfloat16"),
    # a quarter of the width, 256..1024 tokens: minutes on a 2-core CPU
    "cpu": dict(hidden=1024, adapters=[4, 16], tokens=[256, 1024], seq=64, decode=32, dtype="float32"),
    "quick": dict(hidden=256, adapters=[4], tokens=[128], seq=32, decode=8, dtype="float32"),
}


def headline():
    """The README rows: inference and training, against peft's mixed batch and a loop over adapters."""
    return [{"what": f"multi-LoRA mixed-adapter batch, {label} (4-16 adapters, mixed ranks)", "where": {"mode": mode},
             "cells": [{"text": "{}x vs peft's mixed batch", "values": [{"ratio": ["peft", "fastpeft"]}]},
                       {"text": "{}x vs a loop over adapters", "values": [{"ratio": ["loop", "fastpeft"]}]},
                       {"text": "base GEMMs at {} of this machine's GEMM throughput",
                        "values": [{"value": "fastpeft", "metric": "base_tflops_of_roofline"}]}]}
            for label, mode in (("infer", "fwd"), ("train", "fwd+bwd"))]  # fmt: skip


def build(hidden, n_adapters, dtype, device):
    """The base layer, our MultiLoRALinear and peft's model over copies of it, same adapter weights."""
    base = nn.Linear(hidden, hidden, bias=False, dtype=dtype, device=device).requires_grad_(False)
    ours = MultiLoRALinear(copy.deepcopy(base), dtype=dtype)  # adapters in the compute dtype, as served
    names = [f"adapter{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        r = RANK_CYCLE[i % len(RANK_CYCLE)]
        ours.add_adapter(name, r, 2 * r)
        nn.init.normal_(ours.lora_B[name].weight, std=0.01)
    model = None
    try:
        import peft

        wrapper = common.OneLayer(copy.deepcopy(base))
        for i, name in enumerate(names):
            r = RANK_CYCLE[i % len(RANK_CYCLE)]
            config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])
            if model is None:
                model = peft.get_peft_model(wrapper, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            for name in names:
                layer.lora_A[name].weight.copy_(ours.lora_A[name].weight)
                layer.lora_B[name].weight.copy_(ours.lora_B[name].weight)
        model = model.to(dtype=dtype).eval()
    except ImportError:
        pass
    return base, ours, model, names


def providers(base, ours, model, names, index, mode, rows):
    """name -> (callable on x, trainable tensors, frozen tensors)."""
    out = {"floor": (base, [], [base.weight])}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    plan = plan_multi_lora(index, rows, len(names))
    out["plan"] = (lambda x: plan_multi_lora(index, rows, len(names)), [], [])
    out["fastpeft"] = (lambda x: ours(x, plan), trainable, [ours.base_layer.weight, plan.sorted_rows, plan.offsets])
    out["fastpeft+plan"] = (lambda x: ours(x, index), trainable, [ours.base_layer.weight])
    if model is not None and mode == "fwd":
        adapter_names = [names[i] for i in index.tolist()]
        out["peft"] = (lambda x: model(x, adapter_names=adapter_names), [], [])
    A = [ours.lora_A[n].weight for n in names]
    B = [ours.lora_B[n].weight for n in names]
    scalings = [ours.scaling[n] for n in names]
    W = ours.base_layer.weight
    out["loop"] = (lambda x: multi_lora_linear_reference(x, W, None, A, B, scalings, index), trainable, [W])
    return out


def make_step(fn, x, grad, mode, path=None):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            fn(x).backward(grad)

    if path is None:
        return run

    def forced():
        # Forward and backward both read the variable: it stays set for the whole step.
        old = os.environ.get(PATH_ENV)
        os.environ[PATH_ENV] = path
        try:
            run()
        finally:
            if old is None:
                os.environ.pop(PATH_ENV)
            else:
                os.environ[PATH_ENV] = old

    return forced


PATH_ENV = "FASTPEFT_MULTI_LORA_PATH"


def forced_paths(device, mode, hidden, dtype):
    """The paths worth timing here: bgmv is a CUDA forward; grouped needs 16-byte rows."""
    paths = ["segment"]
    if (hidden * torch.finfo(dtype).bits // 8) % 16 == 0:
        paths.append("grouped")
    if device.startswith("cuda") and mode == "fwd":
        paths.append("bgmv")
    return paths


def memory(fn, step, trainable, frozen, x, device, mode):
    row = {}
    if mode == "fwd+bwd":
        row["saved_bytes"] = common.saved_activation_bytes(lambda: fn(x), exclude=tuple(trainable) + tuple(frozen))
    row["peak_bytes"] = common.peak_memory_bytes(step, device)
    for p in trainable:
        p.grad = None
    x.grad = None
    return row


def configs(cfg):
    """(tokens, examples) per batch: prefill-like examples of `seq` tokens, and one decode batch."""
    out = [(t, t // cfg["seq"]) for t in cfg["tokens"]]
    out.append((cfg["decode"], cfg["decode"]))
    return out


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on GPU, cpu on CPU")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd (inference, no grad) and/or fwd+bwd (training)")
    args = common.add_common_args(parser, threads=None).parse_args(argv)
    preset = "quick" if args.quick else (args.preset or ("gpu" if args.device.startswith("cuda") else "cpu"))
    cfg = PRESETS[preset]
    device, _ = common.setup(args)
    dtype = getattr(torch, args.dtype or cfg["dtype"])
    reps = args.reps or (3 if preset == "quick" else 10 if device.startswith("cuda") else 5)
    hidden = cfg["hidden"]

    rows = []
    for n_adapters in cfg["adapters"]:
        torch.manual_seed(0)
        base, ours, model, names = build(hidden, n_adapters, dtype, device)
        for tokens, examples in configs(cfg):
            seq = tokens // examples
            index = torch.randint(0, n_adapters, (examples,), device=device)
            x = torch.randn(examples, seq, hidden, dtype=dtype, device=device)
            grad = torch.randn(examples, seq, hidden, dtype=dtype, device=device)
            case = f"{n_adapters} adapters t{tokens} x{examples}"
            for mode in args.modes.split(","):
                xm = x.clone().requires_grad_(mode == "fwd+bwd")
                provs = providers(base, ours, model, names, index, mode, tokens)
                if mode == "fwd+bwd":
                    provs.pop("plan")
                steps = {name: make_step(fn, xm, grad, mode) for name, (fn, _, _) in provs.items()}
                fused = provs["fastpeft"]
                for path in forced_paths(device, mode, hidden, dtype):
                    provs[f"fastpeft[{path}]"] = fused
                    steps[f"fastpeft[{path}]"] = make_step(fused[0], xm, grad, mode, path)
                times = common.time_interleaved(steps, device, warmup=2, reps=reps)
                for name, (fn, trainable, frozen) in provs.items():
                    row = common.make_row("multi_lora", case, mode, dtype, name, times[name], hidden=hidden,
                                          adapters=n_adapters, ranks="8/16/32/64", tokens=tokens, examples=examples)  # fmt: skip
                    row.update(memory(fn, steps[name], trainable, frozen, xm, device, mode))
                    # The frozen GEMMs every provider runs (forward; plus the input gradient in
                    # training), 2 flops per MAC: how close each gets to the base layer's throughput.
                    base_flops = (2 if mode == "fwd" else 4) * tokens * hidden * hidden
                    row["base_tflops"] = base_flops / (row["median_ms"] * 1e-3) / 1e12
                    rows.append(row)
                    print(f"{mode:7s} {case:28s} {name:18s} {row['median_ms']:9.3f} ms  "
                          f"(p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})", flush=True)  # fmt: skip

    # The load average says how shared the machine was while the numbers were taken.
    config = dict(preset=preset, reps=reps, device_peaks=common.device_peaks(device), loadavg=os.getloadavg(), **cfg)
    return common.finish(args, device, f"bench_multi_lora_{preset}", "multi_lora", rows, headline(), config)


if __name__ == "__main__":
    main()
