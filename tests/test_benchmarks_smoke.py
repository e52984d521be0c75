"""Each benchmark runs at its smallest size (no result files written), so none of them rots."""

import importlib.util
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
