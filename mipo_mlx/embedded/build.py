"""Build the embedded default: a small llama chat model trained on synthetic verifiable tasks.

  python -m mipo_mlx.embedded.build            # writes mipo_mlx/embedded/{model,data}

Reproducible: fixed seeds, a fixed number of steps; about 47 minutes on 2 CPU cores
with the system OpenBLAS. The model is trained from random init (full fine-tuning) on
two families of the *train* split:
- worked answers to arithmetic and multiple-choice problems (tasks.synthetic), for few
  enough steps that it answers held-out problems only sometimes: room for MIPO;
- answers to questions that state the user's requirements (tasks.requirements), each
  requirement honoured only at its kind's rate (requirements.RATES), as small instruct
  models follow some preferences and ignore others: something for MIPO to amplify;
- generic answers to the same kind of questions asked with no requirements.
Batches are cut from length-sorted windows, so short problems are not padded to a long
personalization example. The prompt files hold both families from the train, valid and
heldout splits, which are disjoint by construction.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..core.config import DataConfig
from ..core.files import write_jsonl
from ..data.prompts import user_text
from ..data.tasks import requirements as req
from ..data.tasks.synthetic import problems
from ..engine.batching import pack
from ..engine.toy import build_tokenizer, model_config

HERE = Path(__file__).resolve().parent
SHAPE = {"hidden_size": 256, "layers": 4, "intermediate_size": 704, "heads": 4, "kv_heads": 4}


def chat_text(prompt: str, answer: str) -> tuple[str, str]:
    """(prompt part, answer part) exactly as the chat template renders them."""
    return (f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", f"{answer}<|im_end|>")


def encode_examples(tokenizer, examples) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for each (prompt, answer)."""
    out = []
    for prompt, answer in examples:
        head, tail = chat_text(prompt, answer)
        p = tokenizer.encode(head).ids
        out.append((p + tokenizer.encode(tail).ids, len(p)))
    return out


def make_batch(rows, pad_id: int):
    """(inputs, targets, mask) for (ids, prompt length) rows: the answer and end token are
    scored."""
    inputs, targets, mask = pack(
        [ids[:plen] for ids, plen in rows],
        [ids[plen:] for ids, plen in rows],
        pad_id,
        pad_multiple=1,
    )
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def sft_loss(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)  # (B, T, V)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")  # (B, T)
    return (ce * mask).sum() / mask.sum()


def length_buckets(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, rng, window: int = 64
) -> list[np.ndarray]:
    """One epoch's batches from a shuffled `order`: each run of `window` batches is sorted by
    length and cut into batches, so a batch pads to its own examples' length (short math
    examples are not padded to a long personalization one), and the batches are shuffled.
    A trailing part batch is dropped."""
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = order[start : start + window * batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [
            chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_model(
    model,
    data,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    snapshot=None,
    snapshot_every: int = 0,
) -> None:
    # Warmup, then a constant rate: the model after k steps of a longer run is the model
    # `--steps k` builds, so a snapshot can be chosen (on the valid split) and rebuilt exactly.
    warmup = 50
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / warmup, lr, warmup), lambda _: lr], [warmup]
    )
    optimizer = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.98], weight_decay=0.01)
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, sft_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    lengths = np.array([len(ids) for ids, _ in data])
    batches: list[np.ndarray] = []
    tic, running = time.perf_counter(), 0.0
    for it in range(1, steps + 1):
        if not batches:
            batches = length_buckets(rng.permutation(len(data)), lengths, batch_size, rng)
        loss = step(*make_batch([data[i] for i in batches.pop()], pad_id))
        mx.eval(state, loss)
        running = 0.98 * running + 0.02 * loss.item() if it > 1 else loss.item()
        if it % 100 == 0 or it == steps:
            print(
                f"step {it}/{steps} loss {running:.3f} ({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )
        if snapshot is not None and snapshot_every and it % snapshot_every == 0:
            snapshot(it)


def write_prompt_files(
    folder: Path, train: int, valid: int, heldout: int, requirements: bool = False
) -> None:
    """MIPO's training prompts (labels kept for evaluation only), the valid and heldout splits;
    with `requirements`, as many personalization rows again (tasks.requirements), the two
    families alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid), ("heldout", heldout)):
        rows = [p.row() for p in problems(split, count, seed=7)]
        if requirements:
            # Alternating, so the first N rows (data.limit, evaluation.limit) hold both.
            personal = [item.row() for item in req.items(split, count, seed=7)]
            rows = [row for pair in zip(rows, personal) for row in pair]
        write_jsonl(folder / f"{split}.jsonl", rows)


def requirement_examples(n: int, seed: int, rates: dict[str, float]) -> list[tuple[str, str]]:
    """(user turn, answer) for n train-split personalization items, the user turn as a run
    renders it by default (data.context_template); the answer honours each requirement with
    its kind's rate, so the model learns to follow each kind only part of the time."""
    rng, data = random.Random(seed), DataConfig()
    examples = []
    for item in req.items("train", n, seed):
        answer = req.write_answer(item, req.draw_honour(item, rng, rates), rng)
        examples.append((user_text(item.question, item.context, data), answer))
    return examples


def plain_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer) for n train-split questions asked with no requirements: the
    corpus's generic answers. Without them the model has never seen a bare question, and
    its answer to one (a `no_context` negative) is garbled text, which DPO tells apart
    from a fluent answer without learning anything about the requirements."""
    rng, data = random.Random(f"plain-{seed}"), DataConfig()
    return [
        (user_text(item.question, None, data), req.write_answer(item, set(), rng))
        for item in req.items("train", n, seed + 1)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(HERE))
    parser.add_argument("--examples", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--snapshots", help="folder for model snapshots while training (to choose --steps)"
    )
    parser.add_argument("--snapshot-every", type=int, default=250)
    parser.add_argument(
        "--plain",
        type=int,
        default=5000,
        help="also N of those questions asked with no requirements (generic answers)",
    )
    parser.add_argument(
        "--requirements",
        type=int,
        default=15000,
        help="also N personalization examples (tasks.requirements, honoured at RATES)",
    )
    args = parser.parse_args()

    out = Path(args.output)
    corpus = problems("train", args.examples, seed=args.seed)
    examples = [(p.prompt, p.solution) for p in corpus]
    examples += requirement_examples(args.requirements, args.seed, req.RATES)
    examples += plain_examples(args.plain, args.seed)
    tokenizer = build_tokenizer(
        out / "model",
        [t for e in examples for t in chat_text(*e)],
        args.vocab,
        split_digits=True,
        max_length=1024,
    )
    eos = tokenizer.token_to_id("<|im_end|>")
    pad = tokenizer.token_to_id("<|endoftext|>")
    data = encode_examples(tokenizer, examples)

    from mlx_lm.utils import _get_classes, save_config

    config = model_config(
        "llama",
        tokenizer.get_vocab_size(),
        eos,
        SHAPE["hidden_size"],
        SHAPE["layers"],
        SHAPE["intermediate_size"],
        SHAPE["heads"],
        SHAPE["kv_heads"],
        True,
    )
    config["max_position_embeddings"] = 1024
    model_class, args_class = _get_classes(config)
    mx.random.seed(args.seed)
    model = model_class(args_class.from_dict(config))
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"{n:,} parameters; {len(data)} examples; {args.steps} steps of {args.batch_size}",
        flush=True,
    )
    save_config(config, out / "model" / "config.json")

    def snapshot(step: int) -> None:
        folder = Path(args.snapshots) / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((out / "model" / name).read_bytes())
        mx.save_safetensors(
            str(folder / "model.safetensors"),
            dict(tree_flatten(model.parameters())),
            metadata={"format": "mlx"},
        )

    train_model(
        model,
        data,
        args.steps,
        args.batch_size,
        args.lr,
        pad,
        args.seed,
        snapshot if args.snapshots else None,
        args.snapshot_every,
    )
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(out / "model" / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    write_prompt_files(out / "data", 512, 200, 200, requirements=args.requirements > 0)
    print(
        f"wrote {out / 'model'} ({math.fsum(v.nbytes for v in weights.values()) / 1e6:.1f} MB) "
        f"and {out / 'data'}"
    )


if __name__ == "__main__":
    main()
