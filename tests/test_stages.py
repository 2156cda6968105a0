"""The stage API: each stage refuses input the stage before it did not finish, the registries
match the names the settings accept, and the trainer calls its hooks in the documented order."""

from __future__ import annotations

import pytest

from mipo_mlx.core import config as settings
from mipo_mlx.core.config import Config, TrainingConfig
from mipo_mlx.core.errors import Stopped
from mipo_mlx.data.prompts import Rendered
from mipo_mlx.engine.trainer import Hooks, fit, make_loss
from mipo_mlx.stages.evaluation import Heldout, evaluate
from mipo_mlx.stages.negatives import NEGATIVES, Strategy
from mipo_mlx.stages.pairs import make_pairs
from mipo_mlx.stages.reference import score_reference
from mipo_mlx.stages.run import Run
from mipo_mlx.stages.run_folder import RunFolder
from mipo_mlx.stages.trackers import TRACKERS, Tracker
from mipo_mlx.stages.training import train

from .builders import lora_model, made_up_pairs


def scored_pairs(n: int):
    pairs = made_up_pairs(n, 100)
    for p in pairs:
        p.reference_logps = {"chosen": -10.0, "rejected": -12.0}
    return pairs


@pytest.fixture
def run(toy_model, tmp_path):
    model, tokenizer = toy_model
    return Run(Config(), RunFolder(tmp_path), model, tokenizer)


def test_the_run_holds_the_pad_id_and_a_round_its_own_folder(run, tmp_path):
    from mipo_mlx.engine.model import pad_id

    assert run.pad == pad_id(run.tokenizer)
    second = run.round(2)
    assert second.folder.path != run.folder.path and second.model is run.model
    assert run.round(1).folder.path == run.folder.path


def test_training_refuses_pairs_without_reference_log_probs(run, toy_model_dir):
    pairs = scored_pairs(6)
    pairs[3].reference_logps = None
    with pytest.raises(ValueError, match="1 of 6 pairs have no reference log-probs"):
        train(run, pairs)
    with pytest.raises(ValueError, match="no pairs to train on"):
        train(run, [])


def test_the_reference_stage_refuses_pairs_without_tokens(run):
    pairs = made_up_pairs(4, 100)
    pairs[1].rejected_ids = []
    with pytest.raises(ValueError, match="1 pair\\(s\\) without prompt or response tokens"):
        score_reference(run, pairs)
    with pytest.raises(ValueError, match="no pairs to score"):
        score_reference(run, [])


def test_the_pairs_stage_refuses_no_prompts(run):
    with pytest.raises(ValueError, match="no prompts to pair"):
        make_pairs(run, Rendered([], [], [], 0))


def test_evaluation_refuses_no_heldout_prompts(run):
    with pytest.raises(ValueError, match="no held-out prompts"):
        evaluate(run, Heldout(Rendered([], [], [], 0), [], []))


def test_a_pair_is_built_with_keywords_only():
    from mipo_mlx.data.pair_file import Pair

    with pytest.raises(TypeError):
        Pair([], "c", "r", [1], [2], [3], "random", 0)  # positional: refused


def test_every_negative_strategy_the_settings_accept_is_registered():
    assert set(NEGATIVES) == set(settings.NEGATIVE_STRATEGIES)
    assert all(isinstance(s, Strategy) and s.name == n for n, s in NEGATIVES.items())


def test_every_tracker_the_settings_accept_is_registered():
    assert {"none", *TRACKERS} == set(settings.REPORT_TO)
    for name, tracker in TRACKERS.items():
        assert issubclass(tracker, Tracker) and tracker.name == name
        assert tracker.library and tracker.files


class Recorder(Hooks):
    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.step, self.stop_after = 0, stop_after

    def valid_metrics(self):
        self.calls.append(("valid_metrics", self.step + 1))
        return {"valid/loss": 0.5}

    def on_step(self, metrics):
        validated = bool(self.calls) and self.calls[-1][0] == "valid_metrics"
        assert ("valid/loss" in metrics) == validated  # validation first, merged into the row
        self.step = metrics["step"]
        self.calls.append(("on_step", self.step))

    def on_save(self, step):
        self.calls.append(("on_save", step))

    def should_stop(self):
        self.calls.append(("should_stop", self.step))
        return self.stop_after is not None and self.step >= self.stop_after

    def on_checkpoint(self, state):
        self.calls.append(("on_checkpoint", state.step))


def _cycle(pairs, size):
    from mipo_mlx.engine.batching import pack_pairs

    while True:
        yield pack_pairs(pairs[:size], 0)


def test_the_trainer_calls_its_hooks_in_the_documented_order(toy_model_dir):
    model = lora_model(toy_model_dir)
    config = TrainingConfig(valid_every=1, save_every=1, checkpoint_every=1, compile=False)
    hooks = Recorder()
    fit(model, make_loss(config), _cycle(scored_pairs(4), 4), 2, config, hooks)
    each = ["valid_metrics", "on_step", "on_save", "should_stop", "on_checkpoint"]
    assert hooks.calls == [(name, step) for step in (1, 2) for name in each]


def test_a_stop_the_hooks_ask_for_is_checkpointed_first(toy_model_dir):
    model = lora_model(toy_model_dir)
    config = TrainingConfig(checkpoint_every=100, compile=False)
    hooks = Recorder(stop_after=1)
    with pytest.raises(Stopped):
        fit(model, make_loss(config), _cycle(scored_pairs(4), 4), 3, config, hooks)
    assert hooks.calls[-2:] == [("should_stop", 1), ("on_checkpoint", 1)]


def test_loading_a_run_writes_nothing_until_a_stage_writes(toy_model_dir, tmp_path):
    """Run.load makes no folder (evaluate and --ask write nothing there); the first stage that
    writes makes it, with its record of what the run wrote."""
    from mipo_mlx.core.written import RECORD
    from mipo_mlx.data.prompts import read_source, render_prompts

    from .builders import write_prompts

    config = Config()
    config.model.path, config.output.dir = str(toy_model_dir), str(tmp_path / "out" / "run")
    config.generation.max_tokens, config.generation.truncated = 4, "keep"
    job = Run.load(config)
    assert not (tmp_path / "out").exists()
    prompts = write_prompts(tmp_path / "p.jsonl", n=4)
    rendered = render_prompts(read_source(str(prompts)), job.tokenizer, config.data, "p")
    make_pairs(job, rendered)
    assert (tmp_path / "out" / "run" / RECORD).is_file()
