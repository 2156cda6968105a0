"""Answers side by side: the few held-out prompts eval.md (and the commands' printed summary)
show after the table, each with every model's answer and its checks; and `evaluate --ask`.

The prompts are drawn by evaluation.seed alone: the same for every model, a new seed draws
others, and how the answers changed never enters the choice. The table above the section is
the one the results always made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mipo_mlx.data.prompts import Prompt, Rendered
from mipo_mlx.data.tasks import requirements as req
from mipo_mlx.data.tasks.extract import is_correct
from mipo_mlx.engine.generation import Response
from mipo_mlx.stages.evaluation import Heldout, side_by_side
from mipo_mlx.stages.metrics import (
    SIDE_BY_SIDE,
    compliance_metrics,
    example_rows,
    task_scores,
)
from mipo_mlx.stages.report import (
    markdown_table,
    report_markdown,
    side_by_side_markdown,
    write_report,
)

from .builders import run_args, write_prompts
from .in_process import run_main

SEED = 1234


def requirement_prompt(i: int, *requirements) -> Prompt:
    item = req.Item(f"How do I cook rice, case {i}?", "rice", tuple(requirements))
    row = item.row()
    extra = {k: v for k, v in row.items() if k not in ("prompt", "context")}
    return Prompt(f"h:{i}", row["prompt"], row["context"], extra=extra)


def mixed_prompts(n: int, stating: set[int] | None = None) -> list[Prompt]:
    """Rows in `stating` (default: the even ones) state requirements (capitals, question), the
    others carry a label."""
    stating = set(range(0, n, 2)) if stating is None else stating
    return [
        requirement_prompt(i, req.Requirement("capitals"), req.Requirement("question"))
        if i in stating
        else Prompt(f"h:{i}", f"Tom has {i} apples. He buys 1 more.", extra={"answer": str(i + 1)})
        for i in range(n)
    ]


def held(prompts: list[Prompt]) -> Heldout:
    n = len(prompts)
    rendered = Rendered(prompts, [[]] * n, [[1, 2]] * n, 0)
    return Heldout(rendered, [p.extra.get("answer") for p in prompts], ["all"] * n)


GOOD = {  # an answer that meets every check of its row
    "req": "RINSE THE RICE AND BOIL IT. DO YOU LIKE RICE?",
    "label": "{} apples. The answer is {}.",
}
BAD = {  # one that meets none (well formed, no requirement met; a wrong number)
    "req": "Rinse the rice and boil it for ten minutes.",
    "label": "I think it is {} apples. The answer is 0.",
}


def answers(prompts: list[Prompt], good_rows: set[int]) -> list[str]:
    out = []
    for i, p in enumerate(prompts):
        kind = "req" if "requirements" in p.extra else "label"
        text = (GOOD if i in good_rows else BAD)[kind]
        out.append(text.format(p.extra.get("answer"), p.extra.get("answer")))
    return out


def result_for(h: Heldout, texts: list[str], pmi: list[float], seed: int = SEED) -> dict:
    """A model's evaluation result as answer_and_measure keeps it (what the report reads)."""
    responses = [Response([5, 6, 7, 2], True) for _ in texts]
    result = {"n": len(texts), "answers": texts, "pmi_mean": float(np.mean(pmi))}
    result["pmi_ci95"] = [result["pmi_mean"] - 0.1, result["pmi_mean"] + 0.1]
    result.update(compliance_metrics(h.rendered.prompts, texts))
    scored = {"pmi": pmi}
    result["side_by_side"] = side_by_side(h, texts, responses, scored, seed)
    return result


def shown_rows(result: dict) -> list[int]:
    return [e["row"] for e in result["side_by_side"]["examples"]]


def section_prompts(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("### ")]


# ---------------------------------------------------------------- the draw


def test_the_prompts_are_drawn_by_the_seed_alone():
    """Same seed, same rows; other seeds, other rows; in file order, distinct, in range; all
    rows where there are no more than SIDE_BY_SIDE."""
    rows = example_rows(50, SEED)
    assert rows == example_rows(50, SEED) and len(rows) == SIDE_BY_SIDE == 3
    assert rows == sorted(set(rows)) and all(0 <= r < 50 for r in rows)
    draws = {tuple(example_rows(50, seed)) for seed in range(10)}
    assert len(draws) >= 8  # a new seed draws other prompts
    assert example_rows(3, 5) == [0, 1, 2] and example_rows(2, 5) == [0, 1]


def test_the_choice_ignores_how_the_answers_changed():
    """Two experiments on the same 20 prompts: in one the adapters improve exactly on the rows
    the seed draws, in the other on every other row. The section shows the same prompts in
    both, for base and adapters alike: the seed's rows, whatever improved."""
    prompts = mixed_prompts(20)
    h, drawn = held(prompts), example_rows(20, SEED)
    base = result_for(h, answers(prompts, set()), [0.0] * 20)
    improved_there = result_for(h, answers(prompts, set(drawn)), [1.0] * 20)
    improved_elsewhere = result_for(h, answers(prompts, set(range(20)) - set(drawn)), [1.0] * 20)
    # the adapters did change what they say, and where differs between the two experiments
    assert improved_there["answers"] != improved_elsewhere["answers"] != base["answers"]
    for result in (base, improved_there, improved_elsewhere):
        assert shown_rows(result) == drawn
    one = side_by_side_markdown({"base": base, "mipo": improved_there})
    other = side_by_side_markdown({"base": base, "mipo": improved_elsewhere})
    assert section_prompts(one) == section_prompts(other)
    assert section_prompts(one) == [f"### Held-out prompt {r + 1} of 20" for r in drawn]
    assert one != other  # the same prompts, the answers as they are
    assert "drawn from evaluation.seed (1234) alone" in one
    assert "never chosen for how the answers changed" in one
    # another seed: other prompts, for every model
    reseeded = {
        name: result_for(h, r["answers"], [0.0] * 20, seed=7)
        for name, r in {"base": base, "mipo": improved_there}.items()
    }
    assert shown_rows(reseeded["base"]) == shown_rows(reseeded["mipo"]) == example_rows(20, 7)
    assert section_prompts(side_by_side_markdown(reseeded)) != section_prompts(one)


# ---------------------------------------------------------------- what each answer shows


def test_each_answer_with_its_checks_and_its_pmi():
    """Every shown answer is under its prompt with the checks the table counts: requirements
    met (none where the answer is not well formed), well formed, correct against the label,
    and its own PMI (context PMI where the row has a context, KL for adapters)."""
    drawn = example_rows(12, SEED)
    prompts = mixed_prompts(12, {drawn[0], drawn[2]})  # the middle one has a label
    h = held(prompts)
    texts = answers(prompts, {drawn[0], drawn[1]})  # both met every check
    texts[drawn[2]] = "RICE RICE RICE RICE. WHY?"  # meets the surface checks, but is broken
    pmi = [round(0.25 * i - 1, 2) for i in range(12)]
    context = [0.5 + i if p.context is not None else None for i, p in enumerate(prompts)]
    kl = [0.01 * i for i in range(12)]
    responses = [Response([5, 6, 7], i != drawn[1]) for i in range(12)]  # one cut
    result = {"answers": texts, **compliance_metrics(prompts, texts)}
    scored = {"pmi": pmi, "pmi_context": context, "kl": kl}
    result["side_by_side"] = side_by_side(h, texts, responses, scored, SEED)
    section = side_by_side_markdown({"mipo": result})
    scores = task_scores(texts, h.labels, result["compliance_scores"])
    for entry in result["side_by_side"]["examples"]:
        i, p, checks = entry["row"], prompts[entry["row"]], entry["checks"]
        assert entry["answer"] == texts[i] and entry["prompt"] == p.question
        assert entry["pmi"] == pmi[i] and entry["kl"] == kl[i]
        assert entry["pmi_context"] == context[i]
        block = section.split(f"### Held-out prompt {i + 1} of 12")[1].split("### ")[0]
        assert f"> {p.question}" in block and f"> {texts[i].splitlines()[0]}" in block
        line = next(x for x in block.splitlines() if x.startswith("**mipo**: "))
        assert f"PMI {pmi[i]:.2f}" in line and f"KL to the base {kl[i]:.2f}" in line
        assert ("cut at 3 tokens" in line) == (i == drawn[1])
        if "requirements" in p.extra:
            formed = req.well_formed(texts[i], "rice")
            verdicts = [
                formed and v for v in req.compliance(req.requirements_from_row(p.extra), texts[i])
            ]
            assert checks["well_formed"] == formed
            assert [r["met"] for r in checks["requirements"]] == verdicts
            assert sum(verdicts) / len(verdicts) == scores[i]  # as the table counts it
            met = ", ".join(
                f"{k}: {'yes' if v else 'no'}" for k, v in zip(("capitals", "question"), verdicts)
            )
            assert f"requirements met {sum(verdicts)}/2 ({met})" in line
            assert ("; well formed" in line) == formed and ("not well formed" in line) != formed
            assert f"context PMI {context[i]:.2f}" in line and f"context: {p.context}" in block
            assert "correct" not in line
        else:
            right = is_correct(texts[i], p.extra["answer"])
            assert checks == {"label": p.extra["answer"], "correct": right}
            assert ("not correct" in line) != right and "requirements" not in line
            assert f"expected answer: {p.extra['answer']}" in block
            assert "context PMI" not in line
    shown = result["side_by_side"]["examples"]
    assert [e["checks"].get("well_formed") for e in shown] == [True, None, False]
    assert [e["checks"].get("correct") for e in shown] == [None, True, None]
    assert [sum(r["met"] for r in e["checks"].get("requirements", [])) for e in shown] == [2, 0, 0]


def test_every_round_is_shown_under_each_prompt_in_order():
    prompts = mixed_prompts(9)
    h = held(prompts)
    names = ["base", "round 1", "round 2", "round 3"]
    results = {
        name: result_for(h, answers(prompts, set(range(k))), [float(k)] * 9)
        for k, name in enumerate(names)
    }
    section = side_by_side_markdown(results)
    blocks = section.split("### Held-out prompt ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        heads = [line.split("**")[1] for line in block.splitlines() if line.startswith("**")]
        assert heads == names
        for k, name in enumerate(names):
            assert f"**{name}**: " in block and f"PMI {float(k):.2f}" in block


def test_the_table_is_unchanged_and_the_section_follows_it(tmp_path):
    """eval.md is the table the results made before (the new key is not a row of it), then the
    section; eval.json keeps every key and adds 'side_by_side'."""
    prompts = mixed_prompts(8)
    h = held(prompts)
    results = {
        "base": result_for(h, answers(prompts, set()), [0.0] * 8),
        "mipo": result_for(h, answers(prompts, {0, 1, 2}), [1.0] * 8),
    }
    without = {n: {k: v for k, v in r.items() if k != "side_by_side"} for n, r in results.items()}
    table = markdown_table(results)
    assert table == markdown_table(without)
    report = write_report(tmp_path, results, plots=False)
    assert report == report_markdown(results) == (tmp_path / "eval.md").read_text()
    assert report == table + "\n" + side_by_side_markdown(results)
    assert report_markdown(without) == table  # an evaluation kept from before: the table only
    kept = json.loads((tmp_path / "eval.json").read_text())
    assert kept == json.loads(json.dumps(results))
    assert all(set(r) == set(without[n]) | {"side_by_side"} for n, r in kept.items())
    assert not any(line.startswith("|") for line in side_by_side_markdown(results).splitlines())


# ---------------------------------------------------------------- on the toy model


def test_the_stage_keeps_each_shown_answers_own_pmi(toy_model):
    """With three held-out prompts all are shown: their PMIs and context PMIs average to the
    table's means, so each is its answer's own; the answers are the ones measured."""
    from contextlib import nullcontext

    from mipo_mlx.core.config import DataConfig, EvaluationConfig
    from mipo_mlx.stages.evaluation import answer_and_measure, heldout

    model, tokenizer = toy_model
    prompts = [
        Prompt(f"p:{i}", f"Tom has {i} apples. How many?", c, extra={"answer": str(i)})
        for i, c in enumerate(["Be brief.", None, "One line."])
    ]
    data, ev = DataConfig(), EvaluationConfig(max_tokens=6, pmi_negatives=2, temperature=1.0)
    h = heldout(tokenizer, prompts, data, "p")
    result = answer_and_measure(model, tokenizer, h, ev, data, 4, nullcontext, "base")
    shown = result["side_by_side"]["examples"]
    assert [e["row"] for e in shown] == [0, 1, 2] and result["side_by_side"]["seed"] == ev.seed
    assert np.mean([e["pmi"] for e in shown]) == pytest.approx(result["pmi_mean"], abs=1e-9)
    context = [e["pmi_context"] for e in shown]
    assert context[1] is None
    assert np.mean([context[0], context[2]]) == pytest.approx(result["pmi_context_mean"], abs=1e-9)
    assert [e["answer"] for e in shown] == result["answers"]
    assert [e["checks"]["correct"] for e in shown] == [
        is_correct(t, str(i)) for i, t in enumerate(result["answers"])
    ]
    assert "kl" not in shown[0]  # the base's KL to itself is not shown
    assert result["examples"][0]["answer"] == result["answers"][0]  # the old key stays


@pytest.fixture
def toy_run(toy_model_dir, tmp_path, capfd):
    """A two-step toy run with held-out prompts of both kinds: its folder and what train
    printed."""
    prompts = write_prompts(tmp_path / "train.jsonl", 8)
    heldout = tmp_path / "heldout.jsonl"
    rows = [requirement_prompt(i, req.Requirement("capitals")) for i in range(3)]
    lines = [{"prompt": p.question, "context": p.context, **p.extra} for p in rows]
    lines += [{"prompt": f"Tom has {i} apples. How many?", "answer": str(i)} for i in range(5)]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "run"
    fast = ["--generation.max_tokens", "4", "--generation.truncated", "keep", "--iters", "2"]
    fast += ["--training.batch_size", "2", "--evaluation.max_tokens", "6"]
    fast += ["--evaluation.pmi_negatives", "1", "--evaluation.plots", "false"]
    fast += ["--evaluation.temperature", "1.0", "--evaluation.prompts", heldout]
    done = run_main("train", run_args(toy_model_dir, prompts, out, *fast), capfd)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_train_and_evaluate_print_the_section_and_evaluate_draws_by_its_seed(
    toy_run, tmp_path, capfd
):
    out, printed = toy_run
    md = (out / "eval.md").read_text()
    results = json.loads((out / "eval.json").read_text())
    table = markdown_table(results)
    assert md.startswith(table + "\n## Answers side by side\n")  # the table as ever, then it
    assert md == report_markdown(results) and md.strip() in printed
    assert [len(r["side_by_side"]["examples"]) for r in results.values()] == [3, 3]
    assert shown_rows(results["base"]) == shown_rows(results["mipo"]) == example_rows(8, SEED)

    def evaluate(where, *extra):
        args = ["--adapters", out, "--output", tmp_path / where, *extra]
        done = run_main("evaluate", args, capfd)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, (tmp_path / where / "eval.md").read_text()

    once, again, reseeded = evaluate("a"), evaluate("b"), evaluate("c", "--evaluation.seed", "7")
    assert once[1] == again[1] and once[1] == md  # deterministic, the run's own report
    assert once[1].strip() in once[0]
    assert (
        section_prompts(reseeded[1])
        == [f"### Held-out prompt {r + 1} of 8" for r in example_rows(8, 7)]
        != section_prompts(md)
    )


def test_ask_answers_one_question_with_base_and_adapters(toy_run, toy_model_dir, capfd):
    """--ask prints the question and each model's answer, sampled as the evaluation samples
    (the same stream), writes nothing, and the answers are the base's and the adapters' (the
    run's adapters made large here, so the two differ)."""
    import mlx.core as mx

    from mipo_mlx.core.config import GenerationConfig
    from mipo_mlx.core.settings import resolve
    from mipo_mlx.data.prompts import render_prompts
    from mipo_mlx.engine import model as mdl
    from mipo_mlx.engine.generation import decode, generate_all
    from mipo_mlx.engine.lora import load_adapters

    out, _ = toy_run
    weights = out / "adapters.safetensors"
    saved = mx.load(str(weights))
    mx.random.seed(0)
    mx.save_safetensors(
        str(weights),
        {k: 2.0 * mx.random.normal(v.shape) if "lora_b" in k else v for k, v in saved.items()},
    )
    before = sorted(p.name for p in out.iterdir())
    question = "What is 3 + 4?"
    done = run_main("evaluate", ["--adapters", out, "--ask", question], capfd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == before  # no report, nothing written

    config = resolve(str(out / "config.yaml"), {})
    e = config.evaluation
    how = GenerationConfig(
        temperature=e.temperature,
        top_p=e.top_p,
        max_tokens=e.max_tokens,
        batch_size=1,
        truncated="keep",
        seed=e.seed,
    )
    model, tokenizer, _ = mdl.load(config.model)
    twice = render_prompts([Prompt("q", question)] * 2, tokenizer, config.data, "q")
    expected = {}
    for name in ("base", "adapters"):
        if name == "adapters":
            load_adapters(model, Path(out))
        (response,) = generate_all(model, tokenizer, twice.ids[:1], how, name, 0)
        expected[name] = decode(tokenizer, response)
    assert expected["base"] != expected["adapters"]
    lines = done.stdout.splitlines()
    assert lines[:2] == ["question:", f"> {question}"]
    assert (
        f"temperature {e.temperature}, top-p {e.top_p}, at most {e.max_tokens} tokens"
        in done.stdout
    )
    base_at = next(i for i, x in enumerate(lines) if x.startswith("base"))
    mipo_at = next(i for i, x in enumerate(lines) if x.startswith(f"adapters ({out})"))
    assert base_at < mipo_at

    def words(quoted: list[str]) -> list[str]:  # the text under a header, as words
        return " ".join(line[1:] for line in quoted).split()

    assert words(lines[base_at + 1 : mipo_at]) == expected["base"].split()
    assert words(lines[mipo_at + 1 :]) == expected["adapters"].split()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ask", "What is 3 + 4?"], "--ask needs --adapters RUN"),
        (["--adapters", "{run}", "--ask", "   "], "--ask: the question is empty"),
        (["--adapters", "{run}", "--ask", ""], "--ask: the question is empty"),
    ],
)
def test_a_bad_ask_is_one_line_and_exit_status_2(args, message, tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapters.safetensors").write_bytes(b"")
    done = run_main("evaluate", [a.format(run=run) for a in args], capfd)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert done.stdout == ""
