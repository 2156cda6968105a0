"""The MIPO pipeline: prompts -> generate -> pairs -> reference scores -> train.

Stages hand over through files in the output folder (config.yaml, pairs.jsonl,
metrics.jsonl, adapters), so any of them can be inspected, rerun or replaced.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import distributed as dist
from . import generate as gen
from . import model as mdl
from . import resume
from .config import Config, to_yaml, validate
from .errors import UserError
from .files import append_jsonl, write_json, write_jsonl, write_text
from .loop import TrainingStopped, evaluate_pairs, make_loss, train
from .pairs import (
    Pair,
    altered_prompts,
    check_derangeable,
    derangement,
    pair_from_row,
    read_pairs,
    split_pairs,
    write_pairs,
)
from .progress import Progress
from .prompts import Prompt, fit_length, messages_for, prompt_row, read_source, render, user_text
from .score import Batch, pack_pairs, score_pairs, sharing_works

# Files of the stages a rerun reuses; an overwrite clears them. With the final outputs, they mark a run.
STAGE_FILES = ("metrics.jsonl", "pairs.jsonl", "eval_base.json", "responses.chosen.jsonl",
               "responses.rejected.jsonl", "train_prompts.jsonl", "eval_prompts.jsonl")
RUN_FILES = ("config.yaml", "adapters.safetensors", "eval.json", *STAGE_FILES, ckpt.NAME)


@dataclass
class Rendered:
    prompts: list[Prompt]  # kept prompts, in file order
    messages: list[list[dict[str, str]]]  # their chat turns
    ids: list[list[int]]  # their token ids through the chat template
    skipped: int  # prompts over the length limit, skipped by policy


@dataclass
class RunResult:
    output: Path
    pairs: list[Pair]
    metrics: dict[str, float]
    evaluation: str | None = None  # the before/after table, when evaluation.prompts is set


def say(message: str) -> None:
    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def progress_bar(total: int, stage: str) -> Progress:
    return Progress(total, stage, enabled=dist.is_main())


def check_output(config: Config, resume_run: bool = False) -> Path:
    """Refuse an output folder that cannot take this run; changes nothing on disk."""
    out = Path(config.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output.dir")
    if resume_run:
        resume.check_same_run(out, config)
        return out
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not config.output.overwrite:
        raise UserError(f"{out}: holds an earlier run ({', '.join(earlier)}); choose another "
                        "output.dir or pass --output.overwrite true")
    return out


def start_output(out: Path, config: Config) -> None:
    """Create the folder and write config.yaml; with overwrite, clear the earlier run's stage files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in STAGE_FILES:  # overwrite was asked for: start anew
        if (out / name).exists():
            (out / name).unlink()
    if (out / ckpt.NAME).exists():
        shutil.rmtree(out / ckpt.NAME)
    write_text(out / "config.yaml", to_yaml(config))


def render_prompts(prompts: list[Prompt], tokenizer, config: Config) -> Rendered:
    kept = Rendered([], [], [], 0)
    for prompt in prompts:
        messages = messages_for(prompt, user_text(prompt.question, prompt.context, config.data), config.data)
        ids = fit_length(render(tokenizer, messages, config.data.enable_thinking), config.data,
                         f"{config.data.prompts}:{prompt.line}")
        if ids is None:
            kept.skipped += 1
            continue
        kept.prompts.append(prompt)
        kept.messages.append(messages)
        kept.ids.append(ids)
    if len(kept.prompts) < 2:
        raise UserError(f"{config.data.prompts}: {len(kept.prompts)} prompt(s) fit data.max_prompt_tokens="
                        f"{config.data.max_prompt_tokens}; raise it or set data.long_prompts=truncate")
    return kept


def generate_all(model, tokenizer, ids: list[list[int]], config: Config, stage: str, stream0: int,
                 cache: Path | None = None, should_stop=None):
    """Responses for all prompts; with `cache`, finished ones are kept there and not redone.

    With several ranks, each generates every size-th prompt left to do and all see all
    the responses (each prompt's random stream is its own, so they equal one rank's)."""
    done = resume.cached_responses(cache, len(ids)) if cache is not None and dist.is_main() else {}
    if dist.size() > 1:
        done = _responses(dist.broadcast_object(_rows(done)))
    todo = [i for i in range(len(ids)) if i not in done]
    mine = todo[dist.rank():: dist.size()]
    progress = progress_bar(len(ids), stage)
    progress.update(len(done))

    def finished(k: int, response: gen.Response) -> None:
        if cache is not None and dist.is_main():
            resume.record_response(cache, mine[k], response)
        progress.update(dist.size())
        if should_stop is not None and should_stop():
            raise TrainingStopped(0)

    fresh = gen.generate(model, tokenizer, [ids[i] for i in mine], config.generation,
                         streams=[stream0 + i for i in mine], on_done=finished)
    done.update(zip(mine, fresh))
    if dist.size() > 1:
        for r, part in enumerate(dist.all_gather_objects(_rows(dict(zip(mine, fresh))))):
            for i, response in _responses(part).items():
                done[i] = response
                if cache is not None and dist.is_main() and r != 0:
                    resume.record_response(cache, i, response)
    progress.close()
    return [done[i] for i in range(len(ids))]


def _rows(responses: dict[int, gen.Response]) -> dict[int, list]:
    """Responses as JSON for the other ranks (keys come back as strings)."""
    return {i: [r.token_ids, r.finished] for i, r in responses.items()}


def _responses(rows: dict) -> dict[int, gen.Response]:
    return {int(i): gen.Response(tokens, finished) for i, (tokens, finished) in rows.items()}


def usable(response: gen.Response, config: Config) -> bool:
    """The truncation rule: drop responses that hit max_tokens unless told to keep them."""
    return response.finished or config.generation.truncated == "keep"


def usable_positives(positives, config: Config, needed: int) -> list[int]:
    keep = [i for i, resp in enumerate(positives) if usable(resp, config)]
    if len(keep) < needed:
        raise UserError(f"only {len(keep)} response(s) finished within generation.max_tokens="
                        f"{config.generation.max_tokens}; raise it or set generation.truncated=keep")
    return keep


def random_pairs(r: Rendered, positives, tokenizer, config: Config) -> list[Pair]:
    """`random` negatives: another prompt's positive, via a derangement; no second generation."""
    keep = usable_positives(positives, config, 2)
    texts = [r.messages[i][-1]["content"] for i in keep]
    other = derangement(texts, config.pairs.seed)
    pairs = []
    for slot, i in enumerate(keep):
        j = keep[other[slot]]
        pairs.append(Pair(r.messages[i], decode(tokenizer, positives[i]), decode(tokenizer, positives[j]),
                          r.ids[i], positives[i].token_ids, positives[j].token_ids, "random", i,
                          rejected_source=j))
    return pairs


def generated_pairs(model, tokenizer, r: Rendered, positives, config: Config, out: Path | None = None,
                    should_stop=None) -> list[Pair]:
    """incomplete / no_context / random_context: generate y- from an altered prompt."""
    strategy = config.pairs.negatives
    altered = altered_prompts(r.prompts, strategy, config.data, config.pairs.seed)
    keep = set(usable_positives(positives, config, 1))
    todo = [i for i, text in enumerate(altered) if text is not None and i in keep]
    if not todo:
        raise UserError(f"pairs.negatives={strategy}: no prompt can be altered (e.g. no prompt has "
                        "two sentences for 'incomplete'); choose another strategy")
    ids = [render(tokenizer, messages_for(r.prompts[i], altered[i], config.data), config.data.enable_thinking)
           for i in todo]
    negatives = generate_all(model, tokenizer, ids, config, f"generate {strategy}", gen.STREAM_STRIDE,
                             out / "responses.rejected.jsonl" if out else None, should_stop)
    pairs = []
    for i, negative in zip(todo, negatives):
        if usable(negative, config):
            pairs.append(Pair(r.messages[i], decode(tokenizer, positives[i]), decode(tokenizer, negative),
                              r.ids[i], positives[i].token_ids, negative.token_ids, strategy, i,
                              rejected_prompt=altered[i]))
    if len(pairs) < 1:
        raise UserError("no pair survived the truncation rule; raise generation.max_tokens")
    return pairs


def decode(tokenizer, response: gen.Response) -> str:
    ids = response.token_ids[:-1] if response.finished else response.token_ids
    return tokenizer.decode(ids)


def check_pairs_possible(r: Rendered, config: Config) -> None:
    """Input problems the negative strategy would hit, found before any generation or write."""
    if config.pairs.negatives == "random":
        check_derangeable([m[-1]["content"] for m in r.messages])
    else:
        altered_prompts(r.prompts, config.pairs.negatives, config.data, config.pairs.seed)


def training_prompts(config: Config) -> list[Prompt]:
    """The training prompts as data.* says: a prompt file or a public dataset, skipped, drawn, limited."""
    d = config.data
    return read_source(d.prompts, d.format, d.split, d.skip, d.subset, d.subset_seed, d.limit)


def load_prompts(tokenizer, config: Config) -> Rendered:
    return render_prompts(training_prompts(config), tokenizer, config)


def build_pairs(model, tokenizer, config: Config, out: Path | None = None,
                should_stop=None, rendered: Rendered | None = None) -> tuple[list[Pair], Rendered]:
    rendered = rendered or load_prompts(tokenizer, config)
    if rendered.skipped:
        say(f"skipped {rendered.skipped} prompt(s) longer than data.max_prompt_tokens={config.data.max_prompt_tokens}")
    positives = generate_all(model, tokenizer, rendered.ids, config, "generate chosen", 0,
                             out / "responses.chosen.jsonl" if out else None, should_stop)
    if config.pairs.negatives == "random":
        pairs = random_pairs(rendered, positives, tokenizer, config)
    else:
        pairs = generated_pairs(model, tokenizer, rendered, positives, config, out, should_stop)
    return split_pairs(pairs, config.data.valid_fraction, config.pairs.seed), rendered


def add_reference_logps(model, pairs: list[Pair], pad_id: int, batch_size: int, shared: bool = False) -> None:
    """Score every pair once under the base model (no adapters); stored with the pairs."""
    progress = progress_bar(len(pairs), "score reference")
    mine = dist.shard(len(pairs))
    scores = score_pairs(model, [pairs[i] for i in mine], pad_id, batch_size, shared,
                         on_batch=lambda n: progress.update(n * dist.size()))
    progress.close()
    if dist.size() > 1:  # every rank scored every size-th pair: put them back in order
        parts = dist.all_gather_objects(scores)
        scores = [parts[i % dist.size()][i // dist.size()] for i in range(len(pairs))]
    for pair, (chosen, rejected) in zip(pairs, scores):
        pair.reference_logps = {"chosen": chosen, "rejected": rejected}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def use_shared_prompt(model, pairs: list[Pair], config: Config, pad: int) -> bool:
    """training.shared_prompt: on, off, or auto (on when this model gives the same log-probs)."""
    choice = config.training.shared_prompt
    if choice != "auto" or not pairs:
        return choice == "on"
    if sharing_works(model, pairs[:2], pad):
        return True
    say("note: this model's attention does not take a shared prompt prefix; each prompt runs "
        "with each response (training.shared_prompt=off)")
    return False


def epoch_order(pairs: list[Pair], batch_size: int, seed: int, epoch: int, buckets: int) -> list[int]:
    """A seeded permutation of the pairs; with buckets > 1, each run of `buckets` batches is
    sorted by length before it is cut into batches, and those batches are shuffled."""
    order = np.random.default_rng([seed, epoch]).permutation(len(pairs)).tolist()
    if buckets == 1:
        return order
    rng = np.random.default_rng([seed, epoch, 1])
    out: list[int] = []
    group = batch_size * buckets
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: pairs[i].length)
        batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        for b in rng.permutation(len(batches)):
            out += batches[b]
    return out


def batch_stream(pairs: list[Pair], batch_size: int, seed: int, pad: int, start: int = 0,
                 buckets: int = 1, shared: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Full batches from epoch after epoch (each visits every pair once; batch k is a pure
    function of k); `start` skips the first batches without packing them (resuming).
    With `part` = (rank, ranks), `batch_size` is the global batch and this rank gets
    every ranks-th pair of it."""
    epoch, k = 0, 0
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += epoch_order(pairs, batch_size, seed, epoch, buckets)
            epoch += 1
        if k >= start:
            yield pack_pairs([pairs[i] for i in order[:batch_size][part[0]:: part[1]]], pad, shared)
        order = order[batch_size:]
        k += 1


def total_steps(config: Config, n_train: int) -> int:
    t = config.training
    if t.iters is not None:
        return t.iters
    return max(1, math.ceil(t.epochs * n_train / (t.batch_size * dist.size() * t.grad_accumulation)))


def train_adapters(model, tokenizer, pairs: list[Pair], config: Config, out: Path,
                   should_stop=None, shared: bool = False) -> dict[str, float]:
    """LoRA training on the pairs; `shared` packs each prompt once for both responses."""
    t = config.training
    train_set = [p for p in pairs if p.split == "train"]
    valid_set = [p for p in pairs if p.split == "valid"]
    pad = pad_id(tokenizer)
    trainable = mdl.attach_lora(model, config.lora, t.seed)
    steps = total_steps(config, len(train_set))
    say(f"training {trainable:,} adapter parameters for {steps} steps on {len(train_set)} pairs "
        f"({len(valid_set)} held out)")
    loss = make_loss(t)
    state = load_checkpoint(out)
    if state is not None:
        say(f"resuming training from the checkpoint at step {state.step}")
    if dist.is_main() and (out / "metrics.jsonl").exists():  # lines after the checkpoint will be logged again
        resume.trim_metrics(out / "metrics.jsonl", state.step if state else 0)
    progress = progress_bar(steps, "train")
    progress.update(state.step if state else 0)

    def validate():
        batches = (pack_pairs(valid_set[i : i + t.batch_size], pad, shared)
                   for i in range(0, len(valid_set), t.batch_size))
        return evaluate_pairs(model, loss, batches)

    def log(metrics):
        if dist.is_main():
            append_jsonl(out / "metrics.jsonl", metrics)
        progress.update(1, loss=metrics["loss"], margin=metrics["rewards/margins"],
                        tok_s=f"{metrics['tokens_per_sec']:.0f}")

    def save(step):
        if not dist.is_main():
            return
        mdl.save_adapters(out, model, config.lora, config.model.path)
        if step != steps:
            mdl.save_adapters(out, model, config.lora, config.model.path, name=f"{step:07d}_adapters.safetensors")

    announce_memory(model, train_set, config)
    batches = batch_stream(train_set, t.batch_size * dist.size(), t.seed, pad,
                           start=state.batches_done if state else 0, buckets=t.length_buckets, shared=shared,
                           part=(dist.rank(), dist.size()))
    metrics = train(model, loss, batches, steps, t, validate=validate if valid_set else None, save=save, log=log,
                    resume=state, checkpoint=lambda s: ckpt.save(out, s) if dist.is_main() else None,
                    should_stop=(lambda: dist.any_rank(should_stop())) if should_stop else None)
    progress.close()
    return metrics


def load_checkpoint(out: Path) -> ckpt.TrainState | None:
    """The run's last checkpoint, read by rank 0 and sent to the others (their hosts may not
    have the output folder)."""
    state = ckpt.load(out) if dist.is_main() else None
    if dist.size() == 1:
        return state
    import mlx.core as mx

    def layout(arrays):
        return {k: [list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()}

    meta = dist.broadcast_object(None if state is None else {
        "step": state.step, "batches_done": state.batches_done,
        "adapters": layout(state.adapters), "optimizer": layout(state.optimizer)})
    if meta is None:
        return None

    def arrays(kind: str, mine):
        blank = {k: mx.zeros(shape, getattr(mx, dtype)) for k, (shape, dtype) in meta[kind].items()}
        return dist.broadcast_arrays(mine if mine is not None else blank)

    return ckpt.TrainState(meta["step"], meta["batches_done"], arrays("adapters", state and state.adapters),
                           arrays("optimizer", state and state.optimizer))


def run(config: Config, resume_run: bool = False) -> RunResult:
    """The whole job: (evaluate the base,) generate pairs, score them, train adapters (, evaluate).

    With `resume_run`, finished stages in the output folder are reused and training
    continues from its last checkpoint. SIGINT/SIGTERM stop at the next safe point.
    """
    validate(config)
    stop = resume.StopFlag()
    with stop.installed():
        if config.training.memory_limit_gb:
            import mlx.core as mx

            mx.set_memory_limit(int(config.training.memory_limit_gb * 1e9))
        with together():  # on several ranks: a problem on any stops all
            out = check_output(config, resume_run) if dist.is_main() else Path(config.output.dir).expanduser()
            prompts = training_prompts(config)  # bad input stops before the model loads
            held_prompts = None
            if config.evaluation.prompts:
                from .evaluate import heldout, heldout_prompts

                held_prompts = heldout_prompts(config)
            model, tokenizer, _ = mdl.load(config.model)
            rendered = render_prompts(prompts, tokenizer, config)
            check_pairs_possible(rendered, config)
            held = heldout(tokenizer, config, held_prompts) if held_prompts is not None else None
        if not resume_run and dist.is_main():
            start_output(out, config)
            keep_prompts(out, config, prompts, held_prompts)
        return stages(config, out, stop, model, tokenizer, rendered, held)


def keep_prompts(out: Path, config: Config, prompts: list[Prompt], held: list[Prompt] | None) -> None:
    """Prompts read from a public dataset, as this project's JSONL in the run folder (inspectable,
    and usable as data.prompts or evaluation.prompts of a later run)."""
    if config.data.format != "prompts":
        write_jsonl(out / "train_prompts.jsonl", map(prompt_row, prompts))
    if held is not None and config.evaluation.format != "prompts":
        write_jsonl(out / "eval_prompts.jsonl", map(prompt_row, held))


def stages(config: Config, out: Path, stop, model, tokenizer, rendered: Rendered, held) -> RunResult:
    if held is not None:
        from . import evaluate as ev

        before = cached_json(out / "eval_base.json",
                             lambda: ev.answer_and_measure(model, tokenizer, *held, config, nullcontext, "base"))
    reuse = dist.is_main() and (out / "pairs.jsonl").is_file()  # written whole at the end of its stage
    if dist.broadcast_object(reuse):
        rows = dist.broadcast_object([p.to_row() for p in read_pairs(out / "pairs.jsonl")] if reuse else None)
        pairs = [pair_from_row(row, f"{out / 'pairs.jsonl'}:{n}") for n, row in enumerate(rows, 1)]
        say(f"reusing {len(pairs)} pairs from {out / 'pairs.jsonl'}")
        shared = use_shared_prompt(model, pairs, config, pad_id(tokenizer))
    else:
        pairs, _ = build_pairs(model, tokenizer, config, out, stop, rendered)
        shared = use_shared_prompt(model, pairs, config, pad_id(tokenizer))
        add_reference_logps(model, pairs, pad_id(tokenizer), config.training.score_batch_size, shared)
        if dist.is_main():
            write_pairs(out / "pairs.jsonl", pairs)
        say(f"wrote {len(pairs)} pairs ({config.pairs.negatives} negatives) to {out / 'pairs.jsonl'}")
    metrics = train_adapters(model, tokenizer, pairs, config, out, stop, shared)
    say(f"adapters: {out / mdl.ADAPTER_WEIGHTS}  (mlx_lm.load(model, adapter_path='{out}'))")
    table = None
    if held is not None:
        after = ev.answer_and_measure(model, tokenizer, *held, config, lambda: mdl.adapters_disabled(model), "mipo")
        results = {"base": before, "mipo": after}
        ev.add_judge(results, held[0], config)
        table = ev.write_report(out, results, config.evaluation.plots) if dist.is_main() else ev.markdown_table(results)
        if config.evaluation.plots and dist.is_main():
            from .plots import plot_training

            plot_training(out / "metrics.jsonl", out / "training.png")
    return RunResult(out, pairs, metrics, table)


def cached_json(path: Path, compute):
    """Rank 0's cached value, or a fresh one (the same on every rank: evaluation is seeded)."""
    if dist.is_main() and path.is_file():
        return json.loads(path.read_text())
    value = compute()
    if dist.is_main():
        write_json(path, value)
    return value


@contextmanager
def together():
    """Checks every rank runs: a UserError on any rank stops every rank with its message,
    so none is left waiting for a rank that quit."""
    if dist.size() == 1:
        yield
        return
    error = None
    try:
        yield
    except UserError as err:
        error = str(err)
    dist.agree(error)


def announce_memory(model, pairs: list[Pair], config: Config) -> None:
    from .memory import estimate, working_set_bytes

    need = estimate(model, pairs, config.training)
    limit = working_set_bytes()
    say(f"estimated peak memory {need.total / 1e9:.2f} GB (model {need.model / 1e9:.2f}, adapters + optimizer "
        f"{need.adapters / 1e9:.3f}, activations {need.activations / 1e9:.2f} for the longest batch)")
    if limit and need.total > limit:
        say(f"warning: that exceeds the recommended working set ({limit / 1e9:.1f} GB); lower "
            "training.batch_size, set training.grad_checkpoint=true or data.max_prompt_tokens")
