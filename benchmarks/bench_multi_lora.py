"""Several LoRA adapters in one batch: fastpeft vs peft's adapter_names vs a Python loop vs the base layer.

Every example of a [examples, seq, hidden] batch names one adapter of a bank with mixed ranks.
Providers, side by side on the same weights and routing:
  fastpeft  MultiLoRALinear: base GEMM once, segment GEMMs per adapter, no Python loop; the routing
            plan is made once per batch (untimed here, its time is the `plan` row), as in a model
            where every layer shares it
  fastpeft+plan  the same, making the plan inside every call (a lone layer given an index tensor)
  peft      peft's LoRA layer with adapter_names=[...] (inference only: peft refuses it in training)
  loop      the naive reference: base GEMM, then a Python loop over adapters gathering their rows
  floor     the frozen base layer alone (forward; forward + input gradient in training)
Modes: infer (forward under no_grad) and train (forward + backward into x and every adapter).
Times: median with p20/p80, providers timed in turn within each round; memory: peak CUDA bytes on GPU, bytes saved for backward on CPU.

  python benchmarks/bench_multi_lora.py                 # CPU-sized shapes, fp32
  python benchmarks/bench_multi_lora.py --preset gpu    # hidden 4096, 8..64 adapters, ranks 8..64, 1k..16k tokens, bf16
  python benchmarks/bench_multi_lora.py --quick         # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

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


class OneLayer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


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

        wrapper = OneLayer(copy.deepcopy(base))
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
    if model is not None and mode == "infer":
        adapter_names = [names[i] for i in index.tolist()]
        out["peft"] = (lambda x: model(x, adapter_names=adapter_names), [], [])
    A = [ours.lora_A[n].weight for n in names]
    B = [ours.lora_B[n].weight for n in names]
    scalings = [ours.scaling[n] for n in names]
    W = ours.base_layer.weight
    out["loop"] = (lambda x: multi_lora_linear_reference(x, W, None, A, B, scalings, index), trainable, [W])
    return out


def make_step(fn, x, grad, mode):
    if mode == "infer":

        def step():
            with torch.no_grad():
                fn(x)

    else:

        def step():
            fn(x).backward(grad)

    return step


def interleaved_times(steps, device, warmup, reps):
    """Median and p20/p80 (ms) per provider. Providers take turns within each round, so a load that
    changes over time (a shared CPU) weighs on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(common.time_fn(step, device, warmup=0, reps=1)["median_ms"])
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = {"ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3]}
    return out


def memory(fn, step, trainable, frozen, x, device, mode):
    row = {}
    if mode == "train":
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on GPU, cpu on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else (args.preset or ("gpu" if args.device.startswith("cuda") else "cpu"))
    cfg = PRESETS[preset]
    dtype = getattr(torch, cfg["dtype"])
    device = args.device
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
            for mode in args.modes.split(","):
                xm = x.clone().requires_grad_(mode == "train")
                provs = providers(base, ours, model, names, index, mode, tokens)
                if mode == "train":
                    provs.pop("plan")
                steps = {name: make_step(fn, xm, grad, mode) for name, (fn, _, _) in provs.items()}
                times = interleaved_times(steps, device, warmup=2, reps=reps)
                for name, (fn, trainable, frozen) in provs.items():
                    row = dict(mode=mode, hidden=hidden, adapters=n_adapters, ranks="8/16/32/64", tokens=tokens,
                               examples=examples, dtype=cfg["dtype"], provider=name)  # fmt: skip
                    row.update(times[name])
                    row.update(memory(fn, steps[name], trainable, frozen, xm, device, mode))
                    # The frozen GEMMs every provider runs (forward; plus the input gradient in
                    # training), 2 flops per MAC: how close each gets to the base layer's throughput.
                    base_flops = (2 if mode == "infer" else 4) * tokens * hidden * hidden
                    row["base_tflops"] = base_flops / (row["ms"] * 1e-3) / 1e12
                    rows.append(row)
                    print(f"{mode:5s} adapters={n_adapters:3d} tokens={tokens:6d} examples={examples:4d} {name:13s} "
                          f"{row['ms']:9.3f} ms  (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})", flush=True)  # fmt: skip

    summary = summarize(rows)
    print()
    common.print_table(summary, ["mode", "adapters", "tokens", "examples", "fastpeft_ms", "plan_ms", "floor_ms",
                                 "vs_floor", "peft_ms", "vs_peft", "loop_ms", "vs_loop", "saved_MiB_fastpeft",
                                 "saved_MiB_loop"])  # fmt: skip
    if not args.no_write:
        # The load average says how shared the machine was while the numbers were taken.
        extra = {"summary": summary, "device_peaks": common.device_peaks(device), "loadavg": os.getloadavg()}
        path = common.write_results(f"bench_multi_lora_{preset}", device, rows, extra=extra)
        print(f"\nwrote {path}")
    return rows, summary


def summarize(rows):
    """Per configuration: fastpeft's time against the floor and its speed-up over peft and the loop."""
    by_cfg = {}
    for row in rows:
        key = (row["mode"], row["adapters"], row["tokens"], row["examples"])
        by_cfg.setdefault(key, {})[row["provider"]] = row
    summary = []
    for (mode, adapters, tokens, examples), p in by_cfg.items():
        ours, floor = p["fastpeft"], p["floor"]
        s = dict(mode=mode, adapters=adapters, tokens=tokens, examples=examples, fastpeft_ms=ours["ms"],
                 fastpeft_with_plan_ms=p["fastpeft+plan"]["ms"], floor_ms=floor["ms"],
                 vs_floor=ours["ms"] / floor["ms"])  # fmt: skip
        if "plan" in p:
            s["plan_ms"] = p["plan"]["ms"]
        for peer in ("peft", "loop"):
            if peer in p:
                s[f"{peer}_ms"] = p[peer]["ms"]
                s[f"vs_{peer}"] = p[peer]["ms"] / ours["ms"]
        for name in ("fastpeft", "loop"):
            if p.get(name, {}).get("saved_bytes") is not None:
                s[f"saved_MiB_{name}"] = p[name]["saved_bytes"] / 2**20
        if ours.get("peak_bytes") is not None:
            s["peak_MiB_fastpeft"] = ours["peak_bytes"] / 2**20
        summary.append(s)
    return summary


if __name__ == "__main__":
    main()
