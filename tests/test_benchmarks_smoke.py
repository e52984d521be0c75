"""Each benchmark runs at its smallest size (no result files written), so none of them rots."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lora_quick():
    rows, summary = load("bench_lora").main(["--quick", "--no-write", "--device", "cpu", "--reps", "2"])
    providers = {r["provider"] for r in rows}
    assert {"floor", "fastpeft", "peft", "reference"} <= providers
    assert all(r["both_ms"] > 0 for r in rows)
    assert {s["kind"] for s in summary} == {"dense", "nf4"}


def test_bench_quant4bit_quick(capsys):
    load("bench_quant4bit").main(["--quick", "--no-write", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fastpeft" in out and "bitsandbytes" in out


def test_bench_e2e_qlora_tiny():
    pytest.importorskip("peft")
    summary = load("bench_e2e_qlora").main(["--steps", "3", "--seq", "32", "--batch", "2", "--no-write"])
    assert summary["max_loss_gap"] < 1e-4 and summary["speedup"] > 0


def test_bench_sparse_delta_quick(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    module = load("bench_sparse_delta")
    monkeypatch.setattr(module.common, "RESULTS_DIR", str(tmp_path))
    rows = module.main(["--quick", "--device", "cpu", "--reps", "2", "--densities", "0.01", "0.05"])
    assert {(r["base"], r["mode"], r["provider"]) for r in rows} == {
        (base, mode, provider)
        for base in ("dense", "nf4")
        for mode in ("fwd", "fwd+bwd")
        for provider in ("fastpeft", "reference", "floor")
    }
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"] for r in rows)
    for r in rows:
        if r["provider"] == "fastpeft" and r["mode"] == "fwd+bwd":
            assert r["max_abs_err_y"] < 1e-4 and r["max_abs_err_dvalues"] < 1e-4
            # fastpeft saves x only; the reference also saves the dense W + D (out x in floats).
            assert r["saved_bytes"] == r["tokens"] * r["in_f"] * 4
            ref = next(q for q in rows if q["provider"] == "reference" and q["mode"] == "fwd+bwd"
                       and q["base"] == r["base"] and q["density"] == r["density"])  # fmt: skip
            assert ref["saved_bytes"] >= r["saved_bytes"] + r["in_f"] * r["out_f"] * 4
    written = list(tmp_path.rglob("bench_sparse_delta_quick_cpu.json"))
    assert len(written) == 1
    data = json.loads(written[0].read_text())
    assert data["environment"]["torch"] and len(data["rows"]) == len(rows)
