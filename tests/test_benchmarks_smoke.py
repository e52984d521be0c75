"""Each benchmark runs at its smallest size and writes its results file (to a temporary folder), so
none of them rots, and every row it writes follows the one schema of benchmarks/common.py that
benchmarks/summarize.py reads without code per benchmark."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common, summarize  # noqa: E402

QUICK = ["--quick", "--device", "cpu", "--reps", "2"]
BENCHES = {
    # file: (arguments, packages it needs, providers every case of its fwd(+bwd) rows must have
    #        [, {case prefix: the providers of the cases whose name starts with it instead}])
    "bench_linear_cross_entropy": (QUICK, (), {"fastpeft", "floor", "reference"}),
    "bench_lora": (QUICK, ("bitsandbytes", "peft"), {"fastpeft", "floor", "peft"}),
    "bench_ia3": (QUICK, ("bitsandbytes", "peft"), {"fastpeft", "floor", "reference"}),
    "bench_adapter": (QUICK, (), {"fastpeft", "floor"}),
    "bench_multi_lora": (QUICK, ("peft",), {"fastpeft", "floor", "loop"}),
    "bench_prefix_attention": (QUICK, (), {"fastpeft", "floor", "sdpa", "peft"}),
    "bench_quant4bit": (QUICK, ("bitsandbytes",), {"fastpeft", "bitsandbytes", "reference"}),
    "bench_sparse_delta": (QUICK + ["--densities", "0.01", "0.05"], ("bitsandbytes",), {"fastpeft", "floor", "reference"},
                           {"weight-grad": {"sddmm", "dense_gather"}}),
    "bench_sparse_optim": (QUICK, (), {"fastpeft", "torch_fused_k", "dense_masked"},
                           {"layer": {"fastpeft", "dense_masked", "floor"}}),
    "bench_e2e_qlora": (["--steps", "3", "--seq", "32", "--batch", "2", "--device", "cpu"], ("bitsandbytes", "peft", "transformers"),
                        {"fastpeft", "peft+bitsandbytes"}),
}  # fmt: skip


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_writes_the_schema(name, tmp_path, monkeypatch):
    argv, needs, providers, *by_prefix = BENCHES[name]
    by_prefix = by_prefix[0] if by_prefix else {}
    for package in needs:
        pytest.importorskip(package)
    module = load(name)
    assert module.common is common  # one home for the helpers and the schema
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    rows = module.main(argv)
    common.check_rows(rows)
    assert {r["bench"] for r in rows} == {name.removeprefix("bench_")}
    cases = {(r["case"], r["mode"], r["dtype"]) for r in rows}
    for key in cases:
        have = {r["provider"] for r in rows if (r["case"], r["mode"], r["dtype"]) == key}
        wanted = next((p for prefix, p in by_prefix.items() if key[0].startswith(prefix)), providers)
        assert wanted <= have, (key, have)

    (path,) = tmp_path.rglob(f"{name}*.json")
    data = json.loads(path.read_text())
    assert data["bench"] == name.removeprefix("bench_") and data["environment"]["torch"]
    assert len(data["rows"]) == len(rows)
    common.check_rows(data["rows"])
    common.check_headline(data["headline"])
    table = summarize.table_rows(data)
    assert len(table) == len(data["headline"]) >= 1
    for h, (what, *cells) in zip(data["headline"], table):
        assert [r for r in data["rows"] if summarize._matches(r, h["where"])], h
        assert what and any(c not in ("", "-") for c in cells), (what, cells)
    markdown = summarize.summarise(str(path.parent))
    assert path.name in markdown
    per_case = summarize.cases_table(str(path)).splitlines()  # the docs' "Measured" tables
    header = [c.strip() for c in per_case[2].strip("|").split("|")]
    timed = [r for r in data["rows"] if r.get("median_ms") is not None]
    assert {r["provider"] for r in timed} <= set(header)
    assert len(per_case) == 4 + len({(r["case"], r["mode"]) for r in timed})
    roofline = data["environment"].get("roofline")  # written by common.finish
    if roofline is not None:
        assert roofline["triad_gbps"] > 0 and roofline["gemm_tflops"] > 0
        for r in data["rows"]:
            for metric, limit in common.ROOFLINE_METRICS.items():
                if isinstance(r.get(metric), (int, float)):
                    assert r[f"{metric}_of_roofline"] == pytest.approx(r[metric] / roofline[limit])


def test_bench_sparse_delta_checks(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    module = load("bench_sparse_delta")
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    all_rows = module.main(QUICK + ["--densities", "0.01", "0.05", "--no-write"])
    grad_rows = [r for r in all_rows if r["case"].startswith("weight-grad")]
    rows = [r for r in all_rows if not r["case"].startswith("weight-grad")]
    # The weight gradient alone: both paths at every density of module.GRAD_DENSITIES.
    assert {(r["density"], r["provider"]) for r in grad_rows} == {
        (d, p) for d in module.GRAD_DENSITIES for p in ("sddmm", "dense_gather")}  # fmt: skip
    assert {(r["base"], r["mode"], r["provider"]) for r in rows} == {
        (base, mode, provider)
        for base in ("dense", "nf4")
        for mode in ("fwd", "fwd+bwd")
        for provider in ("fastpeft", "reference", "floor")
    }
    for r in rows:
        if r["provider"] == "fastpeft" and r["mode"] == "fwd+bwd":
            assert r["max_abs_err_y"] < 1e-4 and r["max_abs_err_dvalues"] < 1e-4
            # fastpeft saves x only; the reference also saves the dense W + D (out x in floats).
            assert r["saved_bytes"] == r["tokens"] * r["in_f"] * 4
            ref = next(q for q in rows if q["provider"] == "reference" and q["mode"] == r["mode"] and q["case"] == r["case"])
            assert ref["saved_bytes"] >= r["saved_bytes"] + r["in_f"] * r["out_f"] * 4
    assert not list(tmp_path.rglob("*.json"))  # --no-write


def test_bench_e2e_qlora_matches_peft(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    rows = load("bench_e2e_qlora").main(["--steps", "3", "--seq", "32", "--batch", "2", "--no-write"])
    fast, peer = rows
    assert fast["max_loss_gap"] < 1e-4 and fast["tokens_per_s"] > 0 and peer["tokens_per_s"] > 0
    for r in rows:  # one step measured by fastpeft.memory, side by side
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] > 0, r
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0, r


def test_roofline_is_measured_and_attached():
    roofline = common.machine_roofline("cpu")
    assert roofline is common.machine_roofline("cpu")  # once per process
    assert 0.1 < roofline["triad_gbps"] < 10_000 and 1e-4 < roofline["gemm_tflops"] < 10_000
    rows = [common.make_row("quant4bit", "c", "fwd", "float32", "fastpeft", {"median_ms": 1.0}, gbps=2.0),
            common.make_row("lora", "c", "fwd+bwd", "float32", "fastpeft", {"median_ms": 1.0}, base_tflops=0.5)]
    common.attach_roofline(rows, {"triad_gbps": 4.0, "gemm_tflops": 2.0})
    assert rows[0]["gbps_of_roofline"] == 0.5 and rows[1]["base_tflops_of_roofline"] == 0.25


def test_schema_check_refuses_bad_rows():
    good = common.make_row("lora", "c", "fwd", "float32", "fastpeft", {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0})
    common.check_rows([good])
    for bad in ({**good, "mode": "forward"}, {k: v for k, v in good.items() if k != "case"},
                {**good, "median_ms": None}, {**good, "p20_ms": 2.5}):  # fmt: skip
        with pytest.raises(ValueError):
            common.check_rows([bad])
    with pytest.raises(ValueError):
        common.check_rows([good, dict(good)])  # two rows for one (case, mode, dtype, provider)
