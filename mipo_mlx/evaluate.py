"""`python -m mipo_mlx.evaluate`: accuracy, PMI, length and diversity, base vs adapters.

  python -m mipo_mlx.evaluate --adapters <run-dir>   # the run's model and held-out prompts
  python -m mipo_mlx.evaluate --model <repo-or-folder> --prompts <heldout.jsonl> [--adapters <dir>]
  python -m mipo_mlx.evaluate --adapters <run-dir> --ask "your question"   # both answers, printed

No fusing: adapters are attached to the base in memory. The metrics are the evaluation
stage's (`stages/evaluation.py`, `stages/metrics.py`): PMI, MIPO's own success measure,
needs no labels; accuracy needs an 'answer' on each row. With evaluation.judge, a judge
model scores answers 1-5 per stated preference (personalization rows) and gives the win rate
of the adapters' answers against the base model's (ties win). The report goes to eval.json,
eval.md and eval.png in --output (the run folder by default), or to eval-2.*, eval-3.*, ...
where an earlier report is there: one evaluation never replaces another. eval.md's table is
followed by a few held-out prompts, drawn by evaluation.seed, with each model's answer and its
checks side by side. --ask prints the base's and the adapters' answers to one question of
your own and writes nothing. A run folder's
config.yaml never lets the model run its own code (model.trust_remote_code): only this
command line can. The first Ctrl-C (or SIGTERM) stops at the next batch, writing no report.
This module imports no mlx at the top, so `--help` and config errors need no backend."""

from __future__ import annotations

import sys
from pathlib import Path

from .core.cli import build_parser, parse_args, run_config
from .core.errors import EXIT_INTERRUPTED, Stopped, UserError, reports_user_errors
from .core.settings import resolve, validate

SHORTCUTS = {
    "model": "model.path",
    "prompts": "evaluation.prompts",
    "output": "output.dir",
    "limit": "evaluation.limit",
}


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "python -m mipo_mlx.evaluate",
        __doc__.split("\n\n")[0],
        SHORTCUTS,
        "[--adapters RUN] [--ask Q]",
    )
    parser.add_argument(
        "--adapters",
        metavar="DIR",
        help="a run folder with adapters (its config.yaml fills the rest)",
    )
    parser.add_argument(
        "--ask",
        metavar="QUESTION",
        help="ask the base and the adapters (--adapters) this one question, with the "
        "evaluation's sampling; print both answers and exit (no report, no held-out prompts)",
    )
    yaml_path, overrides, extras = parse_args(parser, argv)
    adapters, ask = extras.get("adapters"), extras.get("ask")
    if ask is not None and not adapters:
        raise UserError(
            "--ask needs --adapters RUN: it answers with the run's base model and its adapters"
        )
    if ask is not None and not ask.strip():
        raise UserError('--ask: the question is empty; give one, e.g. --ask "What is 3 + 4?"')
    if adapters and not (Path(adapters) / "adapters.safetensors").is_file():
        raise UserError(
            f"--adapters {adapters}: no adapters.safetensors there; give a run folder "
            "written by mipo_mlx.train"
        )
    run_settings = None  # the run folder's settings fill what the command line leaves out
    if adapters and yaml_path is None and (Path(adapters) / "config.yaml").is_file():
        run_settings = run_config(adapters, "--model.trust_remote_code true")
    config = validate(resolve(yaml_path, overrides, run_settings), "ask" if ask else "evaluate")
    from .core.backend import require_mlx

    require_mlx()
    from .core.files import folder_lock
    from .pipeline import evaluate
    from .stages.report import asked_text, free_report_stem, write_report

    if ask is not None:  # one question, both models, nothing written
        try:
            answers = evaluate(config, adapters, ask.strip())
        except Stopped as stop:
            print(f"stopped {stop.where}", file=sys.stderr)
            return EXIT_INTERRUPTED
        names = {"base": "base", "mipo": f"adapters ({adapters})"}
        print(asked_text(ask.strip(), answers, config.evaluation, names))
        return 0
    out = Path(overrides.get("output.dir") or adapters or config.output.dir)
    with folder_lock(out, "--output"):  # not while a run writes there, nor a second evaluate
        stem = free_report_stem(out)  # chosen first: a taken name fails before the slow work
        try:
            results = evaluate(config, adapters)
        except Stopped as stop:
            print(f"stopped {stop.where}; no report written", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(write_report(out, results, config.evaluation.plots, stem))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
