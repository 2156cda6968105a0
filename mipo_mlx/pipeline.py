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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import generate as gen
from . import model as mdl
from . import resume
from .config import Config, to_yaml, validate
from .errors import UserError
from .files import append_jsonl, write_json, write_text
from .loop import TrainingStopped, evaluate_pairs, make_loss, train
from .pairs import (
    Pair,
    altered_prompts,
    check_derangeable,
    derangement,
    read_pairs,
    split_pairs,
    write_pairs,
)
from .progress import Progress
from .prompts import Prompt, fit_length, messages_for, read_prompts, render, user_text
from .score import Batch, pack_pairs, score_pairs, sharing_works

# Files of the stages a rerun reuses; an overwrite clears them. With the final outputs, they mark a run.
STAGE_FILES = ("metrics.jsonl", "pairs.jsonl", "eval_base.json", "responses.chosen.jsonl",
               "responses.rejected.jsonl")
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
    print(message, file=sys.stderr, flush=True)


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
    """Responses for all prompts; with `cache`, finished ones are kept there and not redone."""
    done = resume.cached_responses(cache, len(ids)) if cache is not None else {}
    todo = [i for i in range(len(ids)) if i not in done]
    progress = Progress(len(ids), stage)
    progress.update(len(done))

    def finished(k: int, response: gen.Response) -> None:
        if cache is not None:
            resume.record_response(cache, todo[k], response)
        progress.update(1)
        if should_stop is not None and should_stop():
            raise TrainingStopped(0)

    fresh = gen.generate(model, tokenizer, [ids[i] for i in todo], config.generation,
                         streams=[stream0 + i for i in todo], on_done=finished)
    done.update(zip(todo, fresh))
    progress.close()
    return [done[i] for i in range(len(ids))]


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


def load_prompts(tokenizer, config: Config) -> Rendered:
    return render_prompts(read_prompts(config.data.prompts, config.data.limit), tokenizer, config)


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
    progress = Progress(len(pairs), "score reference")
    scores = score_pairs(model, pairs, pad_id, batch_size, shared, on_batch=progress.update)
    progress.close()
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

    def length(i: int) -> int:
        p = pairs[i]
        return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))

    rng = np.random.default_rng([seed, epoch, 1])
    out: list[int] = []
    group = batch_size * buckets
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=length)
        batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        for b in rng.permutation(len(batches)):
            out += batches[b]
    return out


def batch_stream(pairs: list[Pair], batch_size: int, seed: int, pad: int, start: int = 0,
                 buckets: int = 1, shared: bool = False) -> Iterator[Batch]:
    """Full batches from epoch after epoch (each visits every pair once; batch k is a pure
    function of k); `start` skips the first batches without packing them (resuming)."""
    epoch, k = 0, 0
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += epoch_order(pairs, batch_size, seed, epoch, buckets)
            epoch += 1
        if k >= start:
            yield pack_pairs([pairs[i] for i in order[:batch_size]], pad, shared)
        order = order[batch_size:]
        k += 1


def total_steps(config: Config, n_train: int) -> int:
    t = config.training
    if t.iters is not None:
        return t.iters
    return max(1, math.ceil(t.epochs * n_train / (t.batch_size * t.grad_accumulation)))


def train_adapters(model, tokenizer, pairs: list[Pair], config: Config, out: Path,
                   should_stop=None) -> dict[str, float]:
    t = config.training
    train_set = [p for p in pairs if p.split == "train"]
    valid_set = [p for p in pairs if p.split == "valid"]
    pad = pad_id(tokenizer)
    shared = use_shared_prompt(model, train_set, config, pad)
    trainable = mdl.attach_lora(model, config.lora, t.seed)
    steps = total_steps(config, len(train_set))
    say(f"training {trainable:,} adapter parameters for {steps} steps on {len(train_set)} pairs "
        f"({len(valid_set)} held out)")
    loss = make_loss(t)
    state = ckpt.load(out)
    if state is not None:
        say(f"resuming training from the checkpoint at step {state.step}")
    if (out / "metrics.jsonl").exists():  # lines after the checkpoint will be logged again
        resume.trim_metrics(out / "metrics.jsonl", state.step if state else 0)
    progress = Progress(steps, "train")
    progress.update(state.step if state else 0)

    def validate():
        batches = (pack_pairs(valid_set[i : i + t.batch_size], pad, shared)
                   for i in range(0, len(valid_set), t.batch_size))
        return evaluate_pairs(model, loss, batches)

    def log(metrics):
        append_jsonl(out / "metrics.jsonl", metrics)
        progress.update(1, loss=metrics["loss"], margin=metrics["rewards/margins"],
                        tok_s=f"{metrics['tokens_per_sec']:.0f}")

    def save(step):
        mdl.save_adapters(out, model, config.lora, config.model.path)
        if step != steps:
            mdl.save_adapters(out, model, config.lora, config.model.path, name=f"{step:07d}_adapters.safetensors")

    announce_memory(model, train_set, config)
    batches = batch_stream(train_set, t.batch_size, t.seed, pad, start=state.batches_done if state else 0,
                           buckets=t.length_buckets, shared=shared)
    metrics = train(model, loss, batches, steps, t, validate=validate if valid_set else None, save=save, log=log,
                    resume=state, checkpoint=lambda s: ckpt.save(out, s), should_stop=should_stop)
    progress.close()
    return metrics


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
        out = check_output(config, resume_run)
        prompts = read_prompts(config.data.prompts, config.data.limit)  # bad input stops before the model loads
        model, tokenizer, _ = mdl.load(config.model)
        rendered = render_prompts(prompts, tokenizer, config)
        check_pairs_possible(rendered, config)
        held = None
        if config.evaluation.prompts:
            from .evaluate import heldout

            held = heldout(tokenizer, config)
        if not resume_run:
            start_output(out, config)
        return stages(config, out, stop, model, tokenizer, rendered, held)


def stages(config: Config, out: Path, stop, model, tokenizer, rendered: Rendered, held) -> RunResult:
    if held is not None:
        from . import evaluate as ev

        before = cached_json(out / "eval_base.json",
                             lambda: ev.answer_and_measure(model, tokenizer, *held, config, nullcontext, "base"))
    if (out / "pairs.jsonl").is_file():  # written whole at the end of its stage
        pairs = read_pairs(out / "pairs.jsonl")
        say(f"reusing {len(pairs)} pairs from {out / 'pairs.jsonl'}")
    else:
        pairs, _ = build_pairs(model, tokenizer, config, out, stop, rendered)
        shared = use_shared_prompt(model, pairs, config, pad_id(tokenizer))
        add_reference_logps(model, pairs, pad_id(tokenizer), config.training.score_batch_size, shared)
        write_pairs(out / "pairs.jsonl", pairs)
        say(f"wrote {len(pairs)} pairs ({config.pairs.negatives} negatives) to {out / 'pairs.jsonl'}")
    metrics = train_adapters(model, tokenizer, pairs, config, out, stop)
    say(f"adapters: {out / mdl.ADAPTER_WEIGHTS}  (mlx_lm.load(model, adapter_path='{out}'))")
    table = None
    if held is not None:
        after = ev.answer_and_measure(model, tokenizer, *held, config, lambda: mdl.adapters_disabled(model), "mipo")
        table = ev.write_report(out, {"base": before, "mipo": after}, config.evaluation.plots)
        if config.evaluation.plots:
            from .plots import plot_training

            plot_training(out / "metrics.jsonl", out / "training.png")
    return RunResult(out, pairs, metrics, table)


def cached_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def announce_memory(model, pairs: list[Pair], config: Config) -> None:
    from .memory import estimate, working_set_bytes

    need = estimate(model, pairs, config.training)
    limit = working_set_bytes()
    say(f"estimated peak memory {need.total / 1e9:.2f} GB (model {need.model / 1e9:.2f}, adapters + optimizer "
        f"{need.adapters / 1e9:.3f}, activations {need.activations / 1e9:.2f} for the longest batch)")
    if limit and need.total > limit:
        say(f"warning: that exceeds the recommended working set ({limit / 1e9:.1f} GB); lower "
            "training.batch_size, set training.grad_checkpoint=true or data.max_prompt_tokens")
