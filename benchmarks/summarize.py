"""Summarise measured benchmark results (benchmarks/results/<device>/*.json) as a Markdown table.

The README's benchmark table is this script's output, pasted: every figure comes from a results
file, and each row names the file it came from. Ratios are "peer time / fastpeft time" (> 1 means
fastpeft is faster) unless the column says otherwise; a range is min..max over the shapes measured.

    python benchmarks/summarize.py [benchmarks/results/<device>]
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def _range(values, fmt="{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if abs(hi - lo) < 1e-9 else f"{fmt.format(lo)}..{fmt.format(hi)}"


def _pivot(rows, keys, value):
    """{(key values): {provider: value}}"""
    table = defaultdict(dict)
    for r in rows:
        table[tuple(r.get(k) for k in keys)][r["provider"]] = r.get(value)
    return table


def _ratios(table, peer, ours="fastpeft"):
    return [t[peer] / t[ours] for t in table.values() if t.get(peer) and t.get(ours)]


def lora(d):
    s = d["summary"]
    dense = [r for r in s if r["kind"] == "dense"]
    nf4 = [r for r in s if r["kind"] == "nf4"]
    out = []
    for name, part in (("dense", dense), ("NF4", nf4)):
        if part:
            out.append((f"LoRA linear fwd+bwd, {name} base, fp32",
                        f"{_range([r['peft_speedup'] for r in part])}x vs peft",
                        f"{_range([r['vs_floor'] for r in part])}x the frozen-linear floor",
                        "saved bytes = peft's without dropout (x + tokens x r)"))  # fmt: skip
    return out


def quant4bit(d):
    t = _pivot(d["rows"], ("shape", "quant_type", "nested"), "gbps")
    ours = [v["fastpeft"] for v in t.values()]
    bnb = [v.get("bitsandbytes") for v in t.values()]
    return [("dequantize 4-bit (nf4/fp4, nested or not), fp32 out", f"fastpeft {_range(ours, '{:.1f}')} GB/s",
             f"bitsandbytes {_range(bnb, '{:.1f}')} GB/s", "bit-exact with bitsandbytes")]  # fmt: skip


def ia3(d):
    out = []
    rows = [r for r in d["rows"] if r["mode"] == "fwd+bwd"]
    for case in ("linear-out", "linear-ff"):
        part = [r for r in rows if r["case"] == case]
        t = _pivot(part, ("base", "tasks"), "median_ms")
        out.append((f"(IA)^3 {case} fwd+bwd (dense and NF4 bases, 1 and 16 tasks)",
                    f"{_range(_ratios(t, 'peft'))}x vs peft",
                    f"{_range([v['fastpeft'] / v['floor'] for v in t.values() if v.get('floor')])}x the base-GEMM floor",
                    ""))  # fmt: skip
    return out


def adapter(d):
    t = _pivot([r for r in d["rows"] if r["mode"] == "fwd+bwd"], ("case",), "median_ms")
    return [("bottleneck adapter fwd+bwd (single, bank of 8, stack of 2)",
             f"{_range(_ratios(t, 'unfused'))}x vs the unfused PyTorch module", "", "")]  # fmt: skip


def sparse(d):
    rows = d["rows"]
    out = []
    for dens in sorted({r["density"] for r in rows}):
        by = {r["provider"]: r for r in rows if r["density"] == dens}
        f, dm, fk = by.get("fastpeft"), by.get("dense_masked"), by.get("torch_fused_k")
        if not f:
            continue
        out.append((f"SparseMaskedAdamW step, density {dens:.1%}",
                    f"{dm['median_ms'] / f['median_ms']:.1f}x faster, {dm['state_bytes'] / f['state_bytes']:.0f}x less "
                    "state than dense-masked AdamW" if dm else "-",
                    f"{f['median_ms'] / fk['median_ms']:.2f}x the time of torch AdamW(fused) on k entries" if fk else "-",
                    ""))  # fmt: skip
    return out


def prefix(d):
    rows = [r for r in d["rows"] if r["mode"] == "forward+backward"]
    t = _pivot(rows, ("S", "P", "N", "H", "Hkv", "D", "B"), "median_ms")
    return [("prefix attention fwd+bwd (GQA, P 16/64, S 128/512)", f"{_range(_ratios(t, 'sdpa'))}x vs concat+SDPA",
             f"{_range(_ratios(t, 'peft'))}x vs peft's path", "")]  # fmt: skip


def multi_lora(d):
    s = d["summary"]
    out = []
    for mode in ("infer", "train"):
        part = [r for r in s if r["mode"] == mode]
        if part:
            vs_peft = [r.get("vs_peft") for r in part]
            out.append((f"multi-LoRA mixed-adapter batch, {mode} (4-16 adapters, mixed ranks)",
                        f"{_range(vs_peft)}x vs peft's mixed batch" if any(vs_peft) else "-",
                        f"{_range([r.get('vs_loop') for r in part])}x vs a loop over adapters", ""))  # fmt: skip
    return out


def sparse_delta(d):
    rows = [r for r in d["rows"] if r.get("mode") == "fwd+bwd"]
    keys = [k for k in ("base", "kind", "shape", "in_f", "out_f", "density") if k in rows[0]] if rows else []
    t = _pivot(rows, keys, "median_ms")
    return [("SparseDeltaLinear fwd+bwd (dense and NF4 bases, density 0.1-2%)",
             f"{_range(_ratios(t, 'reference'))}x vs the dense-delta practice",
             f"{_range([v['fastpeft'] / v['floor'] for v in t.values() if v.get('floor')])}x the frozen-linear floor",
             "saves only x for backward")]  # fmt: skip


def e2e_qlora(d):
    runs = d["runs"]
    fast, peer = runs["fastpeft"], runs.get("peft+bitsandbytes")
    if not peer:
        return []
    gap = max(abs(a - b) for a, b in zip(fast["losses"], peer["losses"]))
    return [("end-to-end QLoRA training steps (Llama architecture, NF4, LoRA r=16 on all linear layers, "
             "gradient checkpointing)", f"{fast['tokens_per_s'] / peer['tokens_per_s']:.2f}x the tokens/s of peft+bitsandbytes",
             f"{fast['tokens_per_s']:.0f} vs {peer['tokens_per_s']:.0f} tokens/s", f"loss curves within {gap:.1e}")]  # fmt: skip


def finetune_minilm(d):
    fast = d["fastpeft"]
    what = f"main job `--method {d['method']}` (MiniLM, test accuracy {d['accuracy_before']:.0%} -> {fast['accuracy_after']:.0%})"
    if "speedup_median_step" not in d:
        return [(what, "no peer", f"median step {fast['median_step_ms']:.0f} ms", "")]
    return [(what, f"{d['speedup_median_step']:.2f}x the speed of {d['peer']}",
             f"median step {fast['median_step_ms']:.0f} ms", f"loss curves within {d['max_loss_gap']:.1e}")]  # fmt: skip


SUMMARISERS = {
    "bench_lora": lora, "bench_quant4bit": quant4bit, "bench_ia3": ia3, "bench_adapter": adapter,
    "bench_sparse_optim": sparse, "bench_prefix_attention": prefix, "bench_multi_lora": multi_lora,
    "bench_e2e_qlora": e2e_qlora, "bench_sparse_delta": sparse_delta, "finetune_minilm": finetune_minilm,
}  # fmt: skip


def summarise(folder: str) -> str:
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        base = os.path.basename(path)
        name = next((k for k in SUMMARISERS if base.startswith(k)), None)
        if name is None:
            continue
        with open(path) as f:
            data = json.load(f)
        for what, a, b, c in SUMMARISERS[name](data):
            lines.append(f"| {what} | {a} | {b} | {c} | [{base}]({os.path.relpath(path, os.path.dirname(HERE))}) |")
    env = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            env = json.load(f).get("environment", env) or env
        if env:
            break
    header = [f"Device: {env.get('device', os.path.basename(folder))}; torch {env.get('torch', '?')}.", "",
              "| what | fastpeft vs peer | second comparison | note | raw |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    return "\n".join(header + lines)


if __name__ == "__main__":
    folders = sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "results", "*")))
    print("\n\n".join(summarise(f) for f in folders if os.path.isdir(f)))
