"""The run object: what every stage needs, made once and handed to each stage.

A stage is a public function over a `Run` and the previous stage's result:

  pairs = make_pairs(run, rendered)            # stages/pairs.py
  shared = shared_prompt(run, pairs)           # stages/reference.py
  score_reference(run, pairs, shared)          # stages/reference.py
  metrics = train(run, pairs, shared)          # stages/training.py
  results = evaluate(run, heldout(...))        # stages/evaluation.py

Each checks its inputs where they come in, and keeps its results in `run.folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import StopFlag
from ..engine import distributed as dist
from ..engine import model as mdl
from ..engine.lora import check_fine_tune, check_lora_keys
from ..engine.model import pad_id, vocab_size
from .run_folder import RunFolder
from .trackers import Tracker


@dataclass
class Run:
    """The settings, the run folder, the stop flag, the tracker, and the model with its
    tokenizer and pad id. `Run.load` loads the model the settings name."""

    config: Config
    folder: RunFolder
    model: Any
    tokenizer: Any
    stop: StopFlag = field(default_factory=StopFlag)
    tracker: Tracker = field(default_factory=Tracker)
    pad: int = field(init=False)

    def __post_init__(self) -> None:
        self.pad = pad_id(self.tokenizer)

    @classmethod
    def load(
        cls,
        config: Config,
        folder: RunFolder | Path | str | None = None,
        stop: StopFlag | None = None,
        tracker: Tracker | None = None,
    ) -> Run:
        """Load config.model (and check that lora.keys name layers it has, and that lora.type
        can train it); the run folder is
        `folder`, else output.dir (made when a stage first writes there)."""
        model, tokenizer, _ = mdl.load(config.model)
        check_lora_keys(model, config.lora)
        check_fine_tune(model, config.lora)
        if not isinstance(folder, RunFolder):
            folder = RunFolder(folder if folder is not None else config.output.dir)
        return cls(config, folder, model, tokenizer, stop or StopFlag(), tracker or Tracker())

    @property
    def vocab(self) -> int | None:
        """The model's vocabulary size: token ids read from files must lie below it."""
        return vocab_size(self.model)

    def round(self, k: int) -> Run:
        """The run of round k: its folder is the round's own (the run folder in round 1)."""
        return replace(self, folder=self.folder.round(k))

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (every rank must ask: a collective)."""
        return dist.any_rank(self.stop())
