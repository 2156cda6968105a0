"""The MIPO jobs, as sequences of stages over one `Run` (stages/run.py):

  run:      prompts -> (evaluate the base) -> make pairs -> score the reference -> train
            -> (evaluate base + adapters)
  evaluate: prompts -> the base (and base + adapters) answer and are measured

Each stage is a public function in stages/ (pairs.make_pairs, reference.score_reference,
training.train, evaluation.evaluate, judge.add_judge); this module checks the inputs, makes
the run and calls the stages in order. Each stage's result is written to the run folder
(responses, pairs.jsonl, metrics.jsonl, checkpoints, adapters, eval.json), so it can be
inspected, and a rerun with --resume picks up what is finished there.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .core.config import Config, to_dict
from .core.errors import StopFlag, Stopped, UserError
from .core.settings import validate
from .data.pair_file import Pair
from .data.prompts import Rendered, block, read_source, render_prompts, user_text
from .engine import distributed as dist
from .engine import model as mdl
from .engine.batching import total_steps
from .engine.lora import ADAPTER_WEIGHTS, adapters_disabled, load_adapters
from .stages import evaluation, trackers
from .stages import guard as grd
from .stages.evaluation import Heldout, heldout, heldout_prompts
from .stages.judge import add_judge
from .stages.metrics import add_compliance_win_rate
from .stages.pairs import check_pairs_possible, make_pairs
from .stages.plots import plot_training
from .stages.reference import score_reference, shared_prompt
from .stages.report import report_markdown, write_report
from .stages.run import Run
from .stages.run_folder import RunFolder, fingerprint, portable
from .stages.training import train


@dataclass
class RunResult:
    output: Path
    pairs: list[Pair]
    metrics: dict[str, float]
    evaluation: str | None = None  # eval.md (the table, answers side by side), with evaluation
    example: str | None = None  # a held-out (else a training) prompt's user turn, to try it on
    guard: str | None = None  # what the guard kept, when guard.prompts is set


def run(config: Config, resume_run: bool = False) -> RunResult:
    """The whole job: (evaluate the base,) generate pairs, score them, train adapters (, evaluate).

    With `resume_run`, finished stages in the output folder are reused and training
    continues from its last checkpoint. SIGINT/SIGTERM stop at the next safe point (`Stopped`),
    from the main thread; from any other thread no signal handler is set.
    """
    validate(config)
    folder = RunFolder(config.output.dir)
    stop = StopFlag()
    with stop.installed(), ExitStack() as resources:
        if config.training.memory_limit_gb:
            mdl.set_memory_limit(config.training.memory_limit_gb)
        # Bad input stops every rank before the model loads or anything is written.
        with dist.together():
            resources.enter_context(folder.locked())  # held until the run ends
            folder.check(config, resume_run)
            d = config.data
            prompts = training_prompts(config)
            held_prompts = heldout_prompts(config.evaluation) if config.evaluation.prompts else None
            valid_prompts = (
                grd.guard_prompts(config.guard, config.evaluation) if config.guard.prompts else None
            )
            if config.evaluation.judge:
                mdl.check_source(config.evaluation.judge, "evaluation.judge")
            # Before the first slow stage: a tracker that cannot start stops the run here (W&B's
            # run starts now; TensorBoard writes nothing until these checks have passed)
            tracker = resources.enter_context(trackers.start(config, folder.path, resume_run))
            job = Run.load(config, folder, stop, tracker)
            tokenizer = job.tokenizer
            rendered = render_prompts(prompts, tokenizer, d, d.prompts)
            for k in range(1, config.training.rounds + 1):
                check_pairs_possible(round_prompts(config, rendered, k), config.pairs, d)
            held = (
                heldout(tokenizer, held_prompts, d, config.evaluation.prompts)
                if held_prompts
                else None
            )
            valid = (
                heldout(tokenizer, valid_prompts, d, config.guard.prompts)
                if valid_prompts
                else None
            )
            inputs = {"train_prompts": fingerprint(rendered.ids)}
            if held is not None:
                inputs["heldout_prompts"] = fingerprint(
                    [
                        held.rendered.ids,
                        held.labels,
                        held.tasks,
                        [p.extra for p in held.rendered.prompts],
                    ]
                )
            if resume_run:  # the held-out prompts may change: see refresh_evaluation
                folder.check_inputs({"train_prompts": inputs["train_prompts"]})
        if not resume_run:
            folder.start(config)
            folder.keep_inputs(inputs)
            folder.keep_record(config, inputs.get("heldout_prompts"))
            if d.format != "prompts":
                folder.keep_prompts("train_prompts.jsonl", prompts)
            if held_prompts and config.evaluation.format != "prompts":
                folder.keep_prompts("eval_prompts.jsonl", held_prompts)
        elif folder.refresh_evaluation(config, inputs.get("heldout_prompts")):
            dist.say(
                "the evaluation settings or held-out prompts changed since the run started: "
                "the base and the adapters are evaluated again"
            )
        if dist.any_rank(stop()):  # a stop while the model loaded: before the first stage
            raise Stopped(0, "before the first stage")
        tracker.log_config(to_dict(portable(config)))  # config.yaml's settings
        result = stages(job, rendered, held, valid)
        first = (held.rendered if held is not None else rendered).prompts[0]
        result.example = user_text(first.question, first.context, d)
        return result


def training_prompts(config: Config):
    """data.prompts as data.* says; with training.fresh_prompts, a block of data.limit prompts
    for each round (round_prompts)."""
    d, t = config.data, config.training
    fresh = t.fresh_prompts and t.rounds > 1
    limit = d.limit * t.rounds if fresh else d.limit
    prompts = read_source(d.prompts, d.format, d.split, d.skip, d.subset, d.subset_seed, limit)
    if fresh and len(prompts) < limit:
        raise UserError(
            f"{d.prompts}: {len(prompts)} prompts; training.fresh_prompts gives each of the "
            f"{t.rounds} rounds its own {d.limit} (data.limit), {limit} in all; lower data.limit "
            "or training.rounds, or add prompts"
        )
    return prompts


def round_prompts(config: Config, rendered: Rendered, k: int) -> Rendered:
    """The prompts round k answers: all of them, or with training.fresh_prompts its own block."""
    if not (config.training.fresh_prompts and config.training.rounds > 1):
        return rendered
    size = -(-len(rendered.prompts) // config.training.rounds)
    return block(rendered, (k - 1) * size, k * size)


def stages(run: Run, rendered: Rendered, held: Heldout | None, valid: Heldout | None) -> RunResult:
    """The stages in order: the base evaluated, then each round's pairs, reference scores,
    training and evaluation, the guard's choice of adapters, and the report."""
    config, folder = run.config, run.folder
    results: dict[str, dict] = {}
    if held is not None:
        results["base"] = folder.cached_json(
            "eval_base.json", lambda: evaluation.evaluate(run, held)
        )
    guard = grd.Guard(
        config.guard,
        folder,
        run.model,
        valid,
        lambda adapters, lean: evaluation.evaluate(run, valid, adapters, lean, "valid"),
    )
    rounds = config.training.rounds
    steps = 0  # of the rounds so far: the tracker's steps run on from round to round
    for k in range(1, rounds + 1):
        pairs, metrics = one_round(run.round(k), round_prompts(config, rendered, k), k, steps)
        steps += total_steps(config.training, sum(p.split == "train" for p in pairs), dist.size())
        if rounds > 1:
            folder.round_adapters(k, run.model, config.lora, config.model.path)
        guard.score_round(k)
        if held is not None and rounds == 1:
            results["mipo"] = evaluation.evaluate(run, held, adapters=True)
        elif held is not None:  # kept, so that a resumed run does not answer again
            results[f"round {k}"] = folder.cached_json(
                f"eval_round-{k}.json", lambda: evaluation.evaluate(run, held, adapters=True)
            )
    verdict = guard.finish()
    if rounds > 1 or valid is not None:  # the last round's, or the one the guard kept
        folder.save_adapters(run.model, config.lora, config.model.path)
    for name, score in zip(results, guard.scores):
        results[name]["guard_score"] = score
    dist.say(
        f"adapters: {folder.path / ADAPTER_WEIGHTS}  "
        f"(mlx_lm.load(model, adapter_path='{folder.path}'))"
    )
    report = None
    if held is not None:
        add_compliance_win_rate(results)
        add_judge(
            results,
            held.rendered.prompts,
            config.evaluation,
            config.model.trust_remote_code,
            run.stop,
        )
        report = report_markdown(results)  # eval.md's text: the table, answers side by side
        dist.main_only(write_report, folder.path, results, config.evaluation.plots)
        if config.evaluation.plots:
            dist.main_only(
                plot_training, folder.path / "metrics.jsonl", folder.path / "training.png"
            )
        run.tracker.log_table("evaluation", report, steps)
        for name in ("eval", "training"):
            run.tracker.log_image(f"plots/{name}", folder.path / f"{name}.png", steps)
    return RunResult(folder.path, pairs, metrics, report, guard=verdict)


def one_round(
    run: Run, rendered: Rendered, k: int, steps_before: int
) -> tuple[list[Pair], dict[str, float]]:
    """Round k: pairs, reference scores and training, each reused from the round's folder
    where there. From round 2 on the model answers with the adapters it has (the previous
    round's), and is the reference its pairs are scored under: each round is a DPO step away
    from the model that made its pairs."""
    pairs = make_pairs(run, rendered, k)
    shared = shared_prompt(run, pairs)
    score_reference(run, pairs, shared)
    metrics = train(run, pairs, shared, attach=k == 1, steps_before=steps_before)
    return pairs, metrics


def evaluate(config: Config, adapters: str | None, ask: str | None = None) -> dict[str, dict]:
    """Base (and, given a run folder's adapters, base + adapters) on the held-out prompts.
    The settings are checked before the model loads; SIGINT/SIGTERM stop at the next batch
    (`Stopped`), as in `run`. With `ask`, no held-out prompt is read: the base (and the
    adapters) answer that one question with the evaluation's sampling (`evaluation.ask`), and
    nothing is measured or written."""
    validate(config, "evaluate" if ask is None else "ask")
    prompts = heldout_prompts(config.evaluation) if ask is None else []
    if config.evaluation.judge and ask is None:
        mdl.check_source(config.evaluation.judge, "evaluation.judge")
    stop = StopFlag()
    with stop.installed():
        job = Run.load(config, stop=stop)
        stop.check("while the model loaded")
        if ask is not None:
            if adapters:
                load_adapters(job.model, Path(adapters))
            return evaluation.ask(job, ask, adapters=bool(adapters))
        held = heldout(job.tokenizer, prompts, config.data, config.evaluation.prompts)
        if adapters:  # read before any answer: a bad folder stops here, not after the base
            load_adapters(job.model, Path(adapters))
        with adapters_disabled(job.model) if adapters else nullcontext():
            results = {"base": evaluation.evaluate(job, held)}
        if adapters:
            results["mipo"] = evaluation.evaluate(job, held, adapters=True)
            add_compliance_win_rate(results)
        trust = config.model.trust_remote_code
        add_judge(results, held.rendered.prompts, config.evaluation, trust, stop)
    return results
