"""Summarise measured benchmark results (benchmarks/results/<device>/*.json) as a Markdown table.

The README's benchmark table is this script's output, pasted: every figure comes from a results
file, and each row names the file it came from. There is no code per benchmark: every results file
is in the schema of benchmarks/common.py and carries its ``headline``, the table rows it wants as
data (which rows to compare, which providers, which metric); this script evaluates them. Ratios
are min..max over the cases measured. The main job's files (examples/finetune_minilm.py) have their
own format; ``main_job`` turns one into rows and a headline of the same schema.

    python benchmarks/summarize.py [benchmarks/results/<device>]
    python benchmarks/summarize.py --cases benchmarks/results/<device>/bench_<name>.json   # per-case medians
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("what", "fastpeft vs peer", "second comparison", "note", "raw")


def _range(values, fmt="{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if abs(hi - lo) < 1e-9 else f"{fmt.format(lo)}..{fmt.format(hi)}"


def _matches(row: dict, where: dict) -> bool:
    for key, want in where.items():
        if row.get(key) not in (want if isinstance(want, list) else [want]):
            return False
    return True


def _values(spec: dict, by_case: dict) -> list:
    """The spec's number for every case that has what it needs (see benchmarks/common.py)."""
    metric = spec.get("metric", "median_ms")
    out = []
    for providers in by_case.values():
        if "value" in spec:
            out.append(providers.get(spec["value"], {}).get(metric))
            continue
        a, b = (providers.get(p, {}).get(metric) for p in spec["ratio"])
        if a is not None and b:
            out.append(a / b)
    return out


def cell(spec: dict, rows: list) -> str:
    """One table cell: its text with every ``{}`` replaced by its value spec's min..max range."""
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["case"], r["mode"], r["dtype"])][r["provider"]] = r
    ranges = [_range(_values(s, by_case), s.get("fmt", "{:.2f}")) for s in spec.get("values", [])]
    if ranges and all(r == "-" for r in ranges):
        return "-"
    parts = spec.get("text", "").split("{}")
    return "".join(p + (ranges[i] if i < len(ranges) else "") for i, p in enumerate(parts))


def main_job(data: dict) -> dict:
    """A finetune_minilm_<method>.json (the main job's own format) as a results document."""
    fast = data["fastpeft"]
    key = "peft" if data.get("peer", "").startswith("peft") else data.get("peer")
    rows = [dict(case=data["method"], mode="step", dtype="-", provider="fastpeft", **fast)]
    if key and key in data:
        rows.append(dict(case=data["method"], mode="step", dtype="-", provider=data["peer"], **data[key]))
        rows[0]["max_loss_gap"] = data["max_loss_gap"]
        cells = [{"text": "{}x the speed of " + data["peer"],
                  "values": [{"ratio": [data["peer"], "fastpeft"], "metric": "median_step_ms"}]},
                 {"text": "median step {} ms", "values": [{"value": "fastpeft", "metric": "median_step_ms", "fmt": "{:.0f}"}]},
                 {"text": "loss curves within {}", "values": [{"value": "fastpeft", "metric": "max_loss_gap", "fmt": "{:.1e}"}]}]  # fmt: skip
    else:
        cells = [{"text": "no peer"},
                 {"text": "median step {} ms", "values": [{"value": "fastpeft", "metric": "median_step_ms", "fmt": "{:.0f}"}]},
                 {"text": ""}]  # fmt: skip
    what = (f"main job `--method {data['method']}` (MiniLM, test accuracy {data['accuracy_before']:.0%} -> "
            f"{fast['accuracy_after']:.0%})")  # fmt: skip
    return {"environment": data.get("environment", {}), "headline": [{"what": what, "where": {}, "cells": cells}],
            "rows": rows}  # fmt: skip


def table_rows(data: dict) -> list:
    """[(what, cell, cell, cell)] for one results document, from its headline."""
    out = []
    for h in data.get("headline", []):
        rows = [r for r in data["rows"] if _matches(r, h.get("where", {}))]
        cells = [cell(c, rows) for c in h.get("cells", [])]
        out.append((h["what"], *(cells + [""] * 3)[:3]))
    return out


def load(path: str):
    """The results document in ``path`` (a main-job file converted), or None if it is neither."""
    with open(path) as f:
        data = json.load(f)
    if "headline" in data and "rows" in data:
        return data
    if "method" in data and "fastpeft" in data:
        return main_job(data)
    return None


def summarise(folder: str) -> str:
    """The Markdown table (with a device line) of every results file in ``folder``."""
    lines, env = [], {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        data = load(path)
        if data is None:
            print(f"skipped {path}: not in the results schema (benchmarks/migrate_results.py converts old files)",
                  file=sys.stderr)  # fmt: skip
            continue
        env = env or data.get("environment", {})
        link = f"[{os.path.basename(path)}]({os.path.relpath(path, os.path.dirname(HERE))})"
        for what, a, b, c in table_rows(data):
            lines.append(f"| {what} | {a} | {b} | {c} | {link} |")
    header = [f"Device: {env.get('device', os.path.basename(folder))}; torch {env.get('torch', '?')}.", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]  # fmt: skip
    return "\n".join(header + lines)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def cases_table(path: str) -> str:
    """Every case of one results file as a Markdown table of medians: a row per (case, mode),
    a column per provider, each cell "median (p20-p80)" in ms; "saved" (bytes autograd keeps for
    backward) per provider where the rows carry it. What the docs' "Measured" sections show."""
    data = load(path)
    if data is None or "rows" not in data:
        raise ValueError(f"{path} is not a benchmark results file")
    providers, cells, saved = [], defaultdict(dict), defaultdict(dict)
    for r in data["rows"]:
        if r.get("median_ms") is None:
            continue
        if r["provider"] not in providers:
            providers.append(r["provider"])
        key = (r["case"], r["mode"])
        cells[key][r["provider"]] = f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])})"
        if isinstance(r.get("saved_bytes"), int):
            saved[key][r["provider"]] = f"{r['saved_bytes']:,}"
    with_saved = any(saved.values())
    header = ["case", "mode"] + providers + (["saved bytes (" + " / ".join(providers) + ")"] if with_saved else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (case, mode), by_provider in cells.items():
        row = [case, mode] + [by_provider.get(p, "-") for p in providers]
        if with_saved:
            row.append(" / ".join(saved[(case, mode)].get(p, "-") for p in providers) if saved[(case, mode)] else "")
        lines.append("| " + " | ".join(row) + " |")
    env = data.get("environment", {})
    threads = env.get("threads", "?")
    note = (f"{env.get('device', '?')}, torch {env.get('torch', '?')}, {threads} thread{'' if threads == 1 else 's'}, commit "
            f"{env.get('commit', '?')}, {env.get('date', '?')[:10]}; median (p20-p80) ms of "
            f"{data.get('config', {}).get('reps', '?')} interleaved reps ({os.path.basename(path)}).")  # fmt: skip
    return "\n".join([note, ""] + lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cases"]:  # python benchmarks/summarize.py --cases results/<device>/bench_x.json
        print("\n\n".join(cases_table(p) for p in sys.argv[2:]))
        sys.exit(0)
    folders = sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "results", "*")))
    print("\n\n".join(summarise(f) for f in folders if os.path.isdir(f)))
