"""benchmarks/end_to_end.py's two sides, on the toy model and a few prompts: both give the
same pairs and steps, their stage times add up to their wall time, and ours' stage clock
(the run folder's files, in the order the stages write them) still matches the pipeline."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import end_to_end  # noqa: E402

WORKLOAD = dict(prompts=6, evaluate=4, max_tokens=8, batch=2)


@pytest.fixture
def spec(tmp_path, toy_model_dir):
    prompts, heldout = end_to_end.write_prompts(tmp_path / "inputs", WORKLOAD)
    return {
        "model": str(toy_model_dir),
        "prompts": str(prompts),
        "heldout": str(heldout),
        "workload": WORKLOAD,
    }


def check_side(result: dict) -> None:
    assert result["pairs"] == WORKLOAD["prompts"]
    assert result["steps"] == WORKLOAD["prompts"] // WORKLOAD["batch"]
    assert all(s >= 0 for s in result["stages"].values()), result["stages"]
    assert sum(result["stages"].values()) == pytest.approx(result["seconds"], rel=0.02)
    assert 0.05 < result["peak_rss_gb"] < 20
    assert "| accuracy |" in result["table"]


def test_ours_stages_follow_the_run_folder(spec, tmp_path):
    result = end_to_end.ours({**spec, "output": str(tmp_path / "ours")})
    check_side(result)
    # Every stage took time: a file written out of order (or no longer written) shows here
    assert list(result["stages"]) == [s for _, s in end_to_end.OUR_STAGES] + ["report and exit"]
    assert all(s > 0 for s in result["stages"].values()), result["stages"]
    bars = {"answer (base)", "PMI (base)", "generate chosen", "score reference", "train"}
    assert bars <= set(result["progress"]), result["progress"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mlx_lm_lora") is None, reason="the peer side needs mlx-lm-lora"
)
def test_peer_runs_the_same_workload(spec, tmp_path):
    result = end_to_end.peer({**spec, "output": str(tmp_path / "peer")})
    check_side(result)
    lines = (tmp_path / "peer" / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == WORKLOAD["prompts"]
    assert (tmp_path / "peer" / "adapters" / "adapters.safetensors").exists()


def test_accuracy_reads_the_last_number():
    texts = ["so the answer is 42.", "It is 7, not 8", "nothing", ""]
    assert end_to_end.accuracy(texts, ["42", "7", "0", "1"]) == 0.25
