"""The paper recipes in configs/, each run end to end on fixture files in its public format.

Each recipe names a Hub dataset id. Here `huggingface_hub.snapshot_download` is replaced
by a function that returns a folder laid out like that release (the same file names, so
the recipe's `split` strings are exercised), holding a few rows the tests write. The
recipe then runs unchanged but for the model (the tiny test model, also the judge),
`--limit` and short generations.
"""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mipo_mlx.core.settings import resolve, validate
from mipo_mlx.data.templates import GSM8K_8SHOT_PREFIX
from mipo_mlx.stages import judge
from mipo_mlx.train import main

from .builders import check_report
from .test_docs import ROOT

GSM8K_TRAIN = [
    (
        f"Ann has {n} apples. She buys {n + 2} more. How many apples does she have now?",
        f"Ann has {n} + {n + 2} = {2 * n + 2} apples.\n#### {2 * n + 2}",
    )
    for n in range(1, 11)
]
GSM8K_TEST = [
    (
        f"Tom reads {n} pages a day. How many pages does he read in 3 days?",
        f"He reads {n} * 3 = {3 * n} pages.\n#### {3 * n:,}",
    )
    for n in range(400, 410)
]
ARC_CHOICES = {"text": ["ice", "steam", "rock", "sand"], "label": ["A", "B", "C", "D"]}


def parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def gsm8k_release(root):
    parquet(
        root / "main" / "train-00000-of-00001.parquet",
        [{"question": q, "answer": a} for q, a in GSM8K_TRAIN],
    )
    parquet(
        root / "main" / "test-00000-of-00001.parquet",
        [{"question": q, "answer": a} for q, a in GSM8K_TEST],
    )
    # the 'socratic' configuration holds the same questions: split 'main/train' must leave it out
    parquet(
        root / "socratic" / "train-00000-of-00001.parquet", [{"question": "X?", "answer": "#### 1"}]
    )


def svamp_release(root):
    def rows(offset):
        return [
            {
                "ID": f"chal-{offset + n}",
                "Body": f"A shelf holds {n} books. Each book has {n + 1} pages.",
                "Question": "How many pages are on the shelf?",
                "Equation": f"( {n} * {n + 1} )",
                "Answer": float(n * (n + 1)),
                "Type": "Multiplication",
            }
            for n in range(2, 10)
        ]

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(rows(0)), encoding="utf-8")  # a JSON list
    (root / "test.json").write_text(json.dumps(rows(100)), encoding="utf-8")


def arc_release(root):
    for level in ("ARC-Challenge", "ARC-Easy"):
        for split in ("train", "test", "validation"):
            parquet(
                root / level / f"{split}-00000-of-00001.parquet",
                [
                    {
                        "id": f"{level}-{split}-{n}",
                        "question": f"Which is a gas at {n} hundred degrees?",
                        "choices": ARC_CHOICES,
                        "answerKey": "B",
                    }
                    for n in range(10)
                ],
            )


def prism_release(root):
    jsonl(
        root / "conversations.jsonl",
        [
            {
                "conversation_id": f"c{n}",
                "opening_prompt": f"What should I cook tonight, option {n}?",
                "system_string": f"I am vegetarian; keep it under {n + 10} minutes",
            }
            for n in range(12)
        ],
    )
    jsonl(root / "survey.jsonl", [{"user_id": "u1", "age": "25-34"}])  # no prompt: must not be read


def community_release(root):
    jsonl(
        root / "train.jsonl",
        [
            {
                "prompt_id": f"p{n}",
                "first_turn_prompt": f"How do I start running, plan {n}?",
                "preference": f"- I have bad knees\n- answer in {n + 2} bullet points",
            }
            for n in range(12)
        ],
    )


RELEASES = {
    "openai/gsm8k": gsm8k_release,
    "ChilleD/SVAMP": svamp_release,
    "allenai/ai2_arc": arc_release,
    "HannahRoseKirk/prism-alignment": prism_release,
    "facebook/community-alignment-dataset": community_release,
}
RECIPES = ["gsm8k", "svamp", "arc-challenge", "arc-easy", "prism", "community-alignment"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """snapshot_download returning a local copy of each release's layout; records the calls."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, repo_type=None, allow_patterns=None, **_):
        calls.append((repo_id, repo_type))
        root = tmp_path / "hub" / repo_id.replace("/", "--")
        if not root.exists():
            RELEASES[repo_id](root)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def run_recipe(recipe, model_dir, out, *extra):
    argv = [
        "--config",
        str(ROOT / "configs" / f"{recipe}.yaml"),
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--limit",
        "6",
        "--generation.max_tokens",
        "8",
        "--generation.truncated",
        "keep",
        "--evaluation.max_tokens",
        "8",
        "--evaluation.plots",
        "false",
        "--iters",
        "2",
        *extra,
    ]
    config = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())
    if config["evaluation"].get("subset"):  # the paper's 200/500-item draw, from this fixture's 10
        argv += ["--evaluation.subset", "8"]
    if config["evaluation"].get("judge"):
        argv += ["--evaluation.judge", str(model_dir), "--evaluation.judge_max_tokens", "8"]
    return main(argv)


def pairs_of(out):
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]


def user_turn(pair):
    return pair["chosen"][-2]["content"]


def test_every_recipe_is_here():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert set(RECIPES) <= names


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_settings_are_the_papers(recipe):
    config = validate(resolve(str(ROOT / "configs" / f"{recipe}.yaml"), {}))
    arc = recipe.startswith("arc")
    personal = recipe in ("prism", "community-alignment")
    assert config.model.path.startswith("mlx-community/") and config.model.path.endswith("-4bit")
    assert (config.generation.temperature, config.generation.top_p) == (
        (1.0, 0.9) if arc else (0.1, 0.9)
    )
    assert config.evaluation.temperature == config.generation.temperature
    assert config.generation.max_tokens == (512 if personal else 1024)
    assert config.training.beta == 0.1 and config.training.epochs == 1
    # The paper's global batch
    assert config.training.batch_size * config.training.grad_accumulation == 4
    assert config.pairs.negatives == ("no_context" if personal else "random")
    assert config.data.template == {"gsm8k": "gsm8k_8shot", "svamp": "gsm8k_8shot"}.get(
        recipe, "arc_zero_shot" if arc else "prism"
    )
    ev = config.evaluation
    assert (ev.subset, ev.subset_seed if ev.subset else None, ev.limit) == {
        "gsm8k": (200, 42, None),
        "svamp": (None, None, None),
        "arc-challenge": (500, 42, None),
        "arc-easy": (500, 42, None),
        "prism": (None, None, 200),
        "community-alignment": (None, None, 200),
    }[recipe]
    if personal:  # the evaluation's first 200 rows are kept out of training
        assert (
            config.data.skip == 200
            and config.data.prompts == ev.prompts
            and config.data.split == ev.split
        )
        assert ev.judge
    else:
        assert config.data.split != ev.split


def test_the_paper_full_recipe_is_the_released_codes_setting():
    """configs/paper-full-gsm8k.yaml: full fine-tuning, lr 5e-7 with 3% warmup and cosine to
    0.1x, beta 0.1, Adam (0.9, 0.95) without weight decay, clipping at 1.0, a global batch of
    4, one epoch, one round, seed 42, plain sigmoid DPO; GSM8K as configs/gsm8k.yaml."""
    config = validate(resolve(str(ROOT / "configs" / "paper-full-gsm8k.yaml"), {}))
    t, gsm8k = config.training, validate(resolve(str(ROOT / "configs" / "gsm8k.yaml"), {}))
    assert config.lora.type == "full" and config.model.quantize_bits is None
    assert (t.learning_rate, t.warmup_fraction, t.min_lr_ratio) == (5e-7, 0.03, 0.1)
    assert (t.optimizer, t.adam_beta1, t.adam_beta2, t.weight_decay) == ("adamw", 0.9, 0.95, 0)
    assert (t.beta, t.grad_clip, t.batch_size * t.grad_accumulation) == (0.1, 1.0, 4)
    assert (t.epochs, t.rounds, t.seed, t.loss, t.label_smoothing, t.nll_weight) == (
        1,
        1,
        42,
        "sigmoid",
        0.0,
        0.0,
    )
    assert (config.data, config.evaluation, config.pairs) == (
        gsm8k.data,
        gsm8k.evaluation,
        gsm8k.pairs,
    )


@pytest.mark.integration  # a whole run on 8-shot prompts
def test_the_paper_full_recipe_runs(toy_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    assert run_recipe("paper-full-gsm8k", toy_model_dir, out) == 0
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "full"
    assert "| accuracy |" in (out / "eval.md").read_text()


@pytest.mark.integration  # a whole run on 8-shot prompts
def test_gsm8k_recipe(toy_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    assert run_recipe("gsm8k", toy_model_dir, out) == 0
    assert hub == [("openai/gsm8k", "dataset")] * 2
    pairs = pairs_of(out)
    assert len(pairs) == 6 and {p["negatives"] for p in pairs} == {"random"}
    first = next(p for p in pairs if p["source"] == 0)
    assert user_turn(first) == (
        GSM8K_8SHOT_PREFIX
        + "Question: Ann has 1 apples. She buys 3 more. How many apples does she have now?\n"
        "Answer:"
    )
    assert user_turn(first).startswith(
        "Question: There are 15 trees in the grove. "
        "Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. "
        "How many trees did the grove workers plant today?\n"
        "Answer: There are 15 trees originally. "
        "Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. #### 6\n\n"
    )
    # the labels went to evaluation only: the run folder's prompts keep them, the pairs do not
    train_rows = [
        json.loads(line) for line in (out / "train_prompts.jsonl").read_text().splitlines()
    ]
    assert train_rows[0] == {"prompt": GSM8K_TRAIN[0][0], "answer": "4", "id": "gsm8k-0"}
    assert "answer" not in json.dumps(pairs[0]["chosen"])
    held = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(held) == 6 and all(r["prompt"].startswith("Tom reads") for r in held)
    assert {r["answer"] for r in held} <= {
        str(3 * n) for n in range(400, 410)
    }  # "#### 1,200": commas gone
    report = json.loads((out / "eval.json").read_text())
    for name in ("base", "mipo"):
        check_report(report[name], [r["answer"] for r in held])
        assert len(report[name]["answers"]) == 6
    assert "| accuracy |" in (out / "eval.md").read_text()


@pytest.mark.integration  # a whole run on 8-shot prompts
def test_gsm8k_evaluation_subset_is_the_seeded_draw(toy_model_dir, tmp_path, hub):
    """evaluation.subset draws with random.Random(42).sample from the test rows; --limit keeps its
    first N."""
    import random

    out = tmp_path / "out"
    assert run_recipe("gsm8k", toy_model_dir, out, "--iters", "1") == 0
    held = [
        json.loads(line)["prompt"] for line in (out / "eval_prompts.jsonl").read_text().splitlines()
    ]
    expected = random.Random(42).sample([q for q, _ in GSM8K_TEST], 8)[:6]
    assert held == expected


@pytest.mark.integration  # two whole runs on 8-shot prompts
def test_svamp_recipe_and_its_incomplete_negative(toy_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    assert run_recipe("svamp", toy_model_dir, out) == 0
    first = next(p for p in pairs_of(out) if p["source"] == 0)
    assert user_turn(first) == (
        GSM8K_8SHOT_PREFIX + "Question: A shelf holds 2 books. Each book has 3 pages. "
        "How many pages are on the shelf?\nAnswer:"
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["mipo"]["labelled"] == 6  # the test split: 'Answer': 6.0 read as '6'
    held = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert held[0]["answer"] == "6" and held[0]["id"] == "chal-102"

    out = tmp_path / "incomplete"
    assert run_recipe("svamp", toy_model_dir, out, "--pairs.negatives", "incomplete") == 0
    first = next(p for p in pairs_of(out) if p["source"] == 0)
    assert first["negatives"] == "incomplete"
    assert (
        first["rejected_prompt"]
        == GSM8K_8SHOT_PREFIX + "Question: How many pages are on the shelf?\nAnswer:"
    )


@pytest.mark.parametrize("recipe", ["arc-challenge", "arc-easy"])
def test_arc_recipes(recipe, toy_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    assert run_recipe(recipe, toy_model_dir, out) == 0
    level = "ARC-Challenge" if recipe == "arc-challenge" else "ARC-Easy"
    first = next(p for p in pairs_of(out) if p["source"] == 0)
    assert user_turn(first) == (
        "Which is a gas at 0 hundred degrees?\nA) ice\nB) steam\nC) rock\nD) sand\n\n"
        "Think step by step, then finish your response with "
        '"The answer is: <X>" where X is the letter of the correct choice.'
    )
    held = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert all(r["id"].startswith(f"{level}-test-") for r in held) and {
        r["answer"] for r in held
    } == {"B"}
    train = [json.loads(line) for line in (out / "train_prompts.jsonl").read_text().splitlines()]
    assert all(r["id"].startswith(f"{level}-train-") for r in train)
    report = json.loads((out / "eval.json").read_text())
    for name in ("base", "mipo"):
        check_report(report[name], [r["answer"] for r in held])


@pytest.mark.parametrize("recipe", ["prism", "community-alignment"])
def test_personalization_recipes(recipe, toy_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    # the source has 12 rows: the first 200 are the evaluation's, so train on rows after a
    # smaller skip
    assert run_recipe(recipe, toy_model_dir, out, "--data.skip", "6") == 0
    pairs = pairs_of(out)
    assert {p["negatives"] for p in pairs} == {"no_context"}
    first = next(p for p in pairs if p["source"] == 0)
    if recipe == "prism":
        question, context = (
            "What should I cook tonight, option 6?",
            "I am vegetarian; keep it under 16 minutes",
        )
    else:
        question, context = (
            "How do I start running, plan 6?",
            "- I have bad knees\n- answer in 8 bullet points",
        )
    assert user_turn(first) == (
        f"Give me short 2-3 sentence answers to the following prompt: {question} "
        f"Please respect the following requirements made by the user: {context} "
        "Respond with short 2-3 sentences."
    )
    assert first["rejected_prompt"] == (
        f"Give me short 2-3 sentence answers to the following prompt: {question} "
        "Respond with short 2-3 sentences."
    )
    held = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "train_prompts.jsonl").read_text().splitlines()]
    assert len(held) == 6 and not {r["id"] for r in held} & {
        r["id"] for r in train
    }  # evaluation held out
    strict = json.loads(
        (out / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval.json")
    )
    report = strict
    preferences = 2  # 'vegetarian; under N minutes' / two bullet points
    for name in ("base", "mipo"):
        r = report[name]
        check_report(r)
        assert isinstance(r["pmi_context_mean"], float) and len(r["judge_scores"]) == 6
        # An unscored item: none parsed
        assert r["judge_unparsed"] >= preferences * r["judge_scores"].count(None)
        assert "accuracy" not in r  # no labels in personalization rows
    win = judge.win_rate(report["mipo"]["judge_scores"], report["base"]["judge_scores"])
    assert report["mipo"]["win_rate"] == (None if math.isnan(win) else pytest.approx(win))
    assert "win_rate" not in report["base"]
    table = (out / "eval.md").read_text()
    assert "| context PMI (nats) |" in table and "| win rate vs base (ties win) |" in table


def test_judge_needs_contexts(toy_model_dir, tmp_path, hub, capsys):
    """A judge on rows without a user context: one line, exit 2, before any model loads or file is
    written."""
    out = tmp_path / "out"
    assert run_recipe("gsm8k", toy_model_dir, out, "--evaluation.judge", str(toy_model_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no user context; evaluation.judge scores answers" in err[0]
    assert not out.exists()


def test_judge_scores_reach_the_report(toy_model_dir, tmp_path, hub, monkeypatch):
    """The judge's per-item scores become judge_score and the win rate (ties win), per model.

    The tiny judge writes no score, so the judge's verdicts are set here: base items all 3,
    the adapters' items 4, 2, 3, 5, 1, 3 -> win rate 4/6; judge_score means 3 and 3."""
    from mipo_mlx.stages import judge

    verdicts = iter([[3, 3, 3, 3, 3, 3], [4, 2, 3, 5, 1, 3]])
    seen = []

    def score_response(model, tokenizer, items, max_tokens, batch_size, should_stop=None):
        seen.append([(item.question, item.context) for item in items])
        return [judge.ItemScore(float(s), [s], 0) for s in next(verdicts)]

    monkeypatch.setattr(judge, "score_response", score_response)
    out = tmp_path / "out"
    assert run_recipe("prism", toy_model_dir, out, "--data.skip", "6") == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["base"]["judge_score"] == 3.0 and report["mipo"]["judge_score"] == 3.0
    assert report["mipo"]["win_rate"] == pytest.approx(4 / 6)
    assert report["mipo"]["judge_scores"] == [4.0, 2.0, 3.0, 5.0, 1.0, 3.0]
    # the judge sees the question and the stated requirements, not the templated prompt
    assert seen[0][0] == (
        "What should I cook tonight, option 0?",
        "I am vegetarian; keep it under 10 minutes",
    )
    assert seen[0] == seen[1]


def test_limit_and_subset_options():
    """--limit caps the training and the evaluation prompts, --subset draws training prompts;
    an explicit --section.key wins over either."""
    from mipo_mlx.core.cli import parse_args
    from mipo_mlx.train import parser, quick_trial

    def settings(*argv):
        _, overrides, extras = parse_args(parser(), list(argv))
        quick_trial(overrides, extras)
        return {k: v for k, v in overrides.items() if k.endswith(("limit", "subset"))}

    assert settings("--limit", "32") == {"data.limit": 32, "evaluation.limit": 32}
    assert settings("--subset", "700") == {"data.subset": 700}
    assert settings("--limit", "32", "--evaluation.limit", "null") == {
        "data.limit": 32,
        "evaluation.limit": None,
    }
    assert settings() == {}


def test_evaluation_subset_larger_than_the_split(toy_model_dir, tmp_path, hub, capsys):
    """The paper's 200-item draw from a 10-row test file: one line naming the source, exit 2,
    nothing written."""
    out = tmp_path / "out"
    argv = [
        "--config",
        str(ROOT / "configs" / "gsm8k.yaml"),
        "--model",
        str(toy_model_dir),
        "--output",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/gsm8k: subset=200 but the source has 10 rows" in err[0]
    assert not out.exists()
