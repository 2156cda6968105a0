"""Small inputs the tests build in-process: model folders, prompt files, pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mipo_mlx.data.pair_file import Pair
from mipo_mlx.engine.trainer import Hooks

ARITHMETIC = "Tom has {a} apples. He buys {b} more. How many apples does he have?"


def run_args(model_dir, prompts, out, *extra) -> list[str]:
    """The arguments of `python -m mipo_mlx.train` for a model, a prompt file and an output."""
    where = {"--model": model_dir, "--prompts": prompts, "--output": out}
    return [*(str(x) for pair in where.items() for x in pair), *map(str, extra)]


def write_prompts(path: Path, n: int = 16, seed: int = 0, context: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            row = {
                "prompt": ARITHMETIC.format(a=rng.randint(1, 9), b=rng.randint(1, 9))
                + f" Case {i}."
            }
            if context:
                row["context"] = rng.choice(
                    ["Answer in one line.", "Be very polite.", "Use numbers only."]
                )
            fh.write(json.dumps(row) + "\n")
    return path


def made_up_pairs(n: int, vocab: int = 300, seed: int = 0, eos: int | None = None) -> list[Pair]:
    """Pairs of random token ids with varied lengths (for scoring and training tests)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        out = [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))]
        return out + ([eos] if eos is not None else [])

    return [
        Pair(
            messages=[{"role": "user", "content": f"p{i}"}],
            chosen="c",
            rejected="r",
            prompt_ids=ids(5, 14),
            chosen_ids=ids(2, 10),
            rejected_ids=ids(2, 10),
            negatives="random",
            source=i,
            rejected_source=(i + 1) % n,
        )
        for i in range(n)
    ]


def check_report(result: dict, labels: list[str] | None = None, prompts=None) -> None:
    """The values an evaluation report must hold given its own answers: accuracy from the
    answers and labels, compliance from the checkers run on the answers of `prompts`,
    intervals centred on their means, the judge score from its items."""
    import numpy as np
    import pytest

    from mipo_mlx.data.tasks.extract import is_correct

    if labels is not None:
        assert result["labelled"] == len(labels)
        assert result["accuracy"] == pytest.approx(
            np.mean([is_correct(a, str(label)) for a, label in zip(result["answers"], labels)]),
            abs=1e-12,
        )
    if prompts is not None and "compliance_scores" in result:
        from mipo_mlx.data.tasks import requirements as req

        for prompt, answer, score in zip(prompts, result["answers"], result["compliance_scores"]):
            verdicts = req.compliance(req.requirements_from_row(prompt.extra), answer)
            formed = req.well_formed(answer, prompt.extra["topic"])
            assert score == pytest.approx(formed * sum(verdicts) / len(verdicts))
        kept = [s for s in result["compliance_scores"] if s is not None]
        assert result["compliance"] == pytest.approx(np.mean(kept))
    if "compliance" in result:
        low, high = result["compliance_ci95"]
        assert (low + high) / 2 == pytest.approx(result["compliance"], abs=1e-9)
    for key in ("pmi", "pmi_context"):
        if f"{key}_mean" in result:
            low, high = result[f"{key}_ci95"]
            assert (low + high) / 2 == pytest.approx(
                result[f"{key}_mean"], abs=1e-9
            ) and low <= high
    if "judge_scores" in result:
        kept = [s for s in result["judge_scores"] if s is not None]
        assert result["judge_score"] == (pytest.approx(np.mean(kept)) if kept else None)


def remote_code_model(model_dir: Path, folder: Path) -> Path:
    """A copy of `model_dir` whose tokenizer is a class in the folder's own Python file: it
    loads only with trust_remote_code, and its code leaves a file `RAN` in the folder."""
    import shutil

    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "ShippedTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "shipped.ShippedTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "shipped.py").write_text(
        "from pathlib import Path\n"
        "from transformers import PreTrainedTokenizerFast\n"
        f"Path({str(folder / 'RAN')!r}).write_text('the model folder ran code')\n\n\n"
        "class ShippedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    return folder


def lora_model(model_dir: Path):
    """The model at `model_dir` with LoRA whose B is not 0, so every adapter matrix gets a
    gradient."""
    import mlx.core as mx
    from mlx_lm import load

    from mipo_mlx.core.config import LoraConfig
    from mipo_mlx.engine.lora import attach_lora

    model, _ = load(str(model_dir))
    attach_lora(model, LoraConfig(rank=4, dropout=0.0), seed=0)
    mx.random.seed(3)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
    return model


def hooks(**calls) -> Hooks:
    """The trainer's hooks with these methods replaced by callables (on_step=rows.append)."""
    made = Hooks()
    for name, call in calls.items():
        if not callable(getattr(Hooks, name, None)):
            raise AttributeError(f"Hooks has no method {name}")
        setattr(made, name, call)
    return made
