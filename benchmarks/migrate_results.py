"""One-off: re-shape results files written before benchmarks/common.py's one schema into it.

Only moves and renames measured values (and drops ratios derived from them, which summarize.py
now computes); nothing is re-measured or invented. A value the old file never had (the p20/p80 of
LoRA's backward-alone time, the e2e run's per-step times) stays absent / None. Files already in the
schema, and the main job's finetune_minilm_*.json (its own format), are left alone.

    python benchmarks/migrate_results.py benchmarks/results/<device>
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402


def bench_module(name):
    """benchmarks/<name>.py, for its headline()."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strip(row, *keys):
    return {k: v for k, v in row.items() if k not in keys}


def lora(d):
    rows = []
    for r in d["rows"]:
        case = f"{r['kind']} {r['in_f']}x{r['out_f']} t{r['tokens']} r{r['r']}"
        extra = dict(base=r["kind"], in_f=r["in_f"], out_f=r["out_f"], tokens=r["tokens"], r=r["r"])
        mk = lambda mode, st, **more: common.make_row("lora", case, mode, r["dtype"], r["provider"], st, **extra, **more)  # noqa: E731
        rows.append(mk("fwd", dict(median_ms=r["fwd_ms"], p20_ms=r["fwd_p20_ms"], p80_ms=r["fwd_p80_ms"])))
        rows.append(mk("bwd", dict(median_ms=r["bwd_ms"])))  # its p20/p80 were not recorded
        rows.append(mk("fwd+bwd", dict(median_ms=r["both_ms"], p20_ms=r["both_p20_ms"], p80_ms=r["both_p80_ms"]),
                       saved_bytes=r["saved_bytes"], peak_bytes=r["peak_bytes"], base_tflops=r["base_tflops"]))  # fmt: skip
    kinds = list(dict.fromkeys(r["kind"] for r in d["rows"]))
    return "lora", rows, bench_module("bench_lora").headline(kinds, d["rows"][0]["dtype"]), {}


def multi_lora(d):
    modes = {"infer": "fwd", "train": "fwd+bwd"}
    rows = [common.make_row("multi_lora", f"{r['adapters']} adapters t{r['tokens']} x{r['examples']}", modes[r["mode"]],
                            r["dtype"], r["provider"], dict(median_ms=r["ms"]), **strip(r, "mode", "dtype", "provider", "ms"))
            for r in d["rows"]]  # fmt: skip
    config = {k: d[k] for k in ("device_peaks", "loadavg") if k in d}
    return "multi_lora", rows, bench_module("bench_multi_lora").headline(), config


def ia3(d):
    dtype = d["dtype"].replace("torch.", "")
    rows = []
    for r in d["rows"]:
        case = f"scale T{r['tasks']}" if r["case"] == "scale" else f"{r['case']} {r['base']} T{r['tasks']}"
        rows.append(common.make_row("ia3", case, r["mode"], dtype, r["provider"], kind=r["case"],
                                    **strip(r, "case", "mode", "provider")))  # fmt: skip
    return "ia3", rows, bench_module("bench_ia3").headline(d["shapes"]["tasks"]), {"shapes": d["shapes"]}


def adapter(d):
    dtype = d["dtype"].replace("torch.", "")
    rows = [common.make_row("adapter", r["case"], r["mode"], dtype, r["provider"], **strip(r, "case", "mode", "provider"))
            for r in d["rows"]]  # fmt: skip
    return "adapter", rows, bench_module("bench_adapter").headline(d["shapes"]["bank"]), {"shapes": d["shapes"]}


def prefix_attention(d):
    module = bench_module("bench_prefix_attention")
    modes = {"forward": "fwd", "forward+backward": "fwd+bwd"}
    rows = []
    for r in d["rows"]:
        more = strip(r, "mode", "dtype", "provider", "peak_memory_bytes")
        rows.append(common.make_row("prefix_attention", module.case_label(r), modes[r["mode"]], r["dtype"],
                                    r["provider"], **more, peak_bytes=r["peak_memory_bytes"]))  # fmt: skip
    cases = list({module.case_label(r): r for r in d["rows"]}.values())
    return "prefix_attention", rows, module.headline(cases), {"shapes": d["shapes"]}


def quant4bit(d):
    rows = [common.make_row("quant4bit", f"{r['shape']} {r['quant_type']}{' nested' if r['nested'] else ''}", "fwd",
                            r["dtype"], r["provider"], dict(median_ms=r["ms"]), **strip(r, "dtype", "provider", "ms"))
            for r in d["rows"]]  # fmt: skip
    return "quant4bit", rows, bench_module("bench_quant4bit").headline(d["rows"][0]["dtype"]), {}


def sparse_delta(d):
    rows = [common.make_row("sparse_delta", f"{r['base']} {r['in_f']}x{r['out_f']} t{r['tokens']} d{r['density']:g}",
                            r["mode"], r["dtype"], r["provider"],
                            **strip(r, "mode", "dtype", "provider", "vs_floor", "vs_fastpeft"))
            for r in d["rows"]]  # fmt: skip
    config = {k: d[k] for k in ("shapes", "reps", "threads") if k in d}
    return "sparse_delta", rows, bench_module("bench_sparse_delta").headline(), config


def sparse_optim(d):
    rows = []
    for r in d["rows"]:
        more = strip(r, "dtype", "provider", "effective_gbps", "peak_step_bytes", "time_vs_fastpeft", "memory_vs_fastpeft")
        if "effective_gbps" in r:
            more["gbps"] = r["effective_gbps"]
        rows.append(common.make_row("sparse_optim", f"density {r['density']:g}", "step", r["dtype"].replace("torch.", ""),
                                    r["provider"], **more, peak_bytes=r["peak_step_bytes"]))  # fmt: skip
    densities = list(dict.fromkeys(r["density"] for r in d["rows"]))
    return "sparse_optim", rows, bench_module("bench_sparse_optim").headline(densities), {"shapes": d["shapes"]}


def e2e_qlora(d):
    s = d["rows"][0]
    module = bench_module("bench_e2e_qlora")
    case = f"{s['size']} b{s['batch']}x{s['seq']} r{s['r']}"
    extra = {k: s[k] for k in ("size", "batch", "seq", "steps", "r", "gradient_checkpointing")}
    rows = [common.make_row("e2e_qlora", case, "step", s["dtype"], name, **extra, **run) for name, run in d["runs"].items()]
    rows[0].update(max_loss_gap=s["max_loss_gap"], loss_gap_vs=rows[1]["provider"])
    assert rows[0]["provider"] == "fastpeft"
    return "e2e_qlora", rows, module.headline(s["size"], s["r"]), {"size": s["size"]}


CONVERTERS = {"bench_lora": lora, "bench_multi_lora": multi_lora, "bench_ia3": ia3, "bench_adapter": adapter,
              "bench_prefix_attention": prefix_attention, "bench_quant4bit": quant4bit,
              "bench_sparse_delta": sparse_delta, "bench_sparse_optim": sparse_optim, "bench_e2e_qlora": e2e_qlora}  # fmt: skip


def migrate(path: str) -> bool:
    """Rewrite ``path`` in the schema if it is an old bench file; True if it did."""
    with open(path) as f:
        d = json.load(f)
    base = os.path.basename(path)
    name = next((k for k in sorted(CONVERTERS, key=len, reverse=True) if base.startswith(k)), None)
    if name is None or "headline" in d:
        return False
    bench, rows, headline, config = CONVERTERS[name](d)
    config["migrated"] = "re-shaped from the pre-schema file by benchmarks/migrate_results.py; values as measured"
    data = common.results_file(bench, rows, headline, d["environment"], config)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return True


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
            print("migrated" if migrate(p) else "left   ", p)
