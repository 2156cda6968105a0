"""Evaluation: answer extraction on written-out cases, the PMI estimator on known answers,
the evaluation stage as the pipeline runs it against one-by-one log-probs, diversity,
the report table, and `evaluate` on the tiny test model."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.data.tasks.extract import extract_letter, extract_number, is_correct
from mipo_mlx.stages.metrics import distinct_n, other_prompts, pmi_scores
from mipo_mlx.stages.report import markdown_table

from .builders import check_report


@pytest.mark.parametrize(
    "text, number",
    [
        ("3 + 4 = 7. The answer is 7.", "7"),  # right, the embedded format
        ("Natalia sold 48 clips... #### 72", "72"),  # GSM8K format
        ("#### 1,234", "1234"),  # commas dropped
        ("the answer is -5", "-5"),  # sign kept, case ignored
        ("The answer is 12.50 dollars", "12.5"),  # trailing zeros dropped
        ("The answer is 3. Wait, the answer is 4.", "4"),  # the last one counts
        ("#### 9 and the answer is 8", "9"),  # '####' wins over 'the answer is'
        ("I think it is 7.", None),  # missing
        ("The answer is seven.", None),  # malformed: no digits
        ("", None),
        # an 8-shot answer that goes on to invent the next exemplar: its own '####' counts
        (
            "Tom reads 3 * 300 = 900 pages. #### 900\n\nQuestion: Sam has 2 cats. How many?\n"
            "Answer: 2 cats. #### 2",
            "900",
        ),
        ("He has 5 + 2 = 7. The answer is 7.\nQuestion: What is 1+1?\nAnswer: #### 2", "7"),
        ("Question: a restated question? #### 4", "4"),  # at the very start: not a continuation
        ("5 + 3 = 8\n  Question: next one #### 12", None),  # the own part has no answer
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The largest number is 95. The answer is: B", "B"),
        ("the answer is c", "C"),
        ("The answer is (D).", "D"),
        ("The answer is: A. No, the answer is: C", "C"),
        ("Answer: B", None),  # missing the phrase
        ("The answer is: 42", None),  # malformed: not a letter
        ("The answer is: Banana", None),  # a word, not a letter
        # Invented next item ignored
        (
            "The answer is: B\nQuestion: Which is a metal?\nThe answer is: D",
            "B",
        ),
    ],
)
def test_extract_letter(text, letter):
    assert extract_letter(text) == letter


@pytest.mark.parametrize(
    "text, label, right",
    [
        ("3 + 4 = 7. The answer is 7.", "7", True),
        ("3 + 4 = 8. The answer is 8.", "7", False),  # wrong
        ("3 + 4 = 7.", "7", False),  # no final answer
        ("The answer is: B", "B", True),
        ("The answer is: C", "B", False),
        ("The answer is 7", "7.0", True),
    ],
)
def test_is_correct(text, label, right):
    assert is_correct(text, label) is right


class FirstTokenModel:
    """Logits at every position depend only on the first input token: W[x0] (V = 4).

    So log p(y | x) = sum_t log softmax(W[x0])[y_t], which the test computes by hand.
    """

    def __init__(self, table):
        self.table = mx.array(table, dtype=mx.float32)  # (prompts, V)

    def __call__(self, inputs):
        rows = self.table[inputs[:, 0]]  # (N, V)
        return mx.broadcast_to(rows[:, None, :], (*inputs.shape, rows.shape[-1]))


def log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    return v - np.log(np.exp(v).sum())


def test_pmi_known_answer():
    """3 prompts (first tokens 0, 1, 2), answers of two tokens; with k = 2 every other prompt is
    used, so PMI_i = lp(y_i | x_i) - mean_{j != i} lp(y_i | x_j), computed here by hand."""
    table = [[2.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 2.0, -1.0]]
    prompts = [[0, 3], [1, 3], [2, 3]]
    answers = [[0, 0], [1, 3], [2, 1]]
    got, context, _ = pmi_scores(FirstTokenModel(table), prompts, answers, k=2, seed=0, pad=3)
    assert context is None
    lp = lambda i, j: sum(log_softmax(table[j])[t] for t in answers[i])  # noqa: E731
    expected = [lp(i, i) - np.mean([lp(i, j) for j in range(3) if j != i]) for i in range(3)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[0] == pytest.approx(
        2 * (log_softmax(table[0])[0] - log_softmax(table[1])[0]), abs=1e-5
    )


def test_pmi_is_zero_when_the_model_ignores_the_prompt():
    table = [[1.0, 0.5, -0.5, 0.0]] * 4
    got, _, _ = pmi_scores(
        FirstTokenModel(table),
        [[0], [1], [2], [3]],
        [[1, 2], [0], [3, 3, 1], [2]],
        k=3,
        seed=1,
        pad=0,
    )
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_context_pmi_known_answer():
    """Prompts with a context start with tokens 0, 1, 2; the same prompts without it start with 3.
    The context PMI is lp(y_i | x_i, c_i) - lp(y_i | x_i) (sign: positive when the context makes
    the answer likelier), and the PMI's mean runs over the k other prompts only, never over the
    context-free column."""
    table = [
        [2.0, 0.0, 0.0, -1.0],
        [0.0, 2.0, 0.0, -1.0],
        [0.0, 0.0, 2.0, -1.0],
        [0.5, 0.5, 0.5, 0.5],
    ]
    prompts, plain = [[0, 3], [1, 3], [2, 3]], [[3, 3], [3, 3], [3, 3]]
    answers = [[0, 0], [1, 3], [2, 1]]
    pmi, context, _ = pmi_scores(
        FirstTokenModel(table), prompts, answers, k=2, seed=0, pad=3, plain_ids=plain
    )
    lp = lambda i, j: sum(log_softmax(table[j])[t] for t in answers[i])  # noqa: E731
    np.testing.assert_allclose(
        pmi,
        [lp(i, i) - np.mean([lp(i, j) for j in range(3) if j != i]) for i in range(3)],
        atol=1e-5,
    )
    np.testing.assert_allclose(context, [lp(i, i) - lp(i, 3) for i in range(3)], atol=1e-5)
    # answer 0 is two tokens 0 under its own prompt: 2 * (log softmax([2, 0, 0, -1])[0] - log(1/4))
    assert context[0] == pytest.approx(2 * (log_softmax(table[0])[0] - np.log(0.25)), abs=1e-5)
    assert context[0] > 0


def test_answer_and_measure_equals_one_by_one(toy_model):
    """The evaluation stage as the pipeline runs it (personalization rows, so the context PMI too):
    its PMI and context PMI means equal the ones computed here, row by row, from single-row
    log-probs of the same answers under their own, the k other and the context-free prompts."""
    from contextlib import nullcontext

    from mipo_mlx.core.config import DataConfig, EvaluationConfig
    from mipo_mlx.data.prompts import Prompt
    from mipo_mlx.engine.generation import generate_all
    from mipo_mlx.engine.scoring import response_logps
    from mipo_mlx.stages.evaluation import answer_and_measure, heldout, sampling
    from mipo_mlx.stages.metrics import context_free_ids

    model, tokenizer = toy_model
    prompts = [
        Prompt(f"p.jsonl:{i}", f"Tom has {i} apples. How many?", c, extra={"answer": str(i)})
        for i, c in enumerate(["Be brief.", "Use numbers.", "Be polite.", "One line.", "Say why."])
    ]
    data, ev = (
        DataConfig(),
        EvaluationConfig(max_tokens=6, pmi_negatives=2, seed=3, temperature=1.0),
    )
    held = heldout(tokenizer, prompts, data, "p.jsonl")
    result = answer_and_measure(model, tokenizer, held, ev, data, 4, nullcontext, "base")

    ids = held.rendered.ids
    answers = [
        r.token_ids for r in generate_all(model, tokenizer, ids, sampling(ev, 4), "again", 0)
    ]
    plain = context_free_ids(tokenizer, held.rendered, data)
    one = lambda prompt, answer: response_logps(model, [prompt], [answer], 0)[0]  # noqa: E731
    others = other_prompts(len(ids), 2, 3)
    pmi = [
        one(ids[i], a) - np.mean([one(ids[j], a) for j in others[i]]) for i, a in enumerate(answers)
    ]
    context = [one(ids[i], a) - one(plain[i], a) for i, a in enumerate(answers)]
    assert result["pmi_mean"] == pytest.approx(np.mean(pmi), abs=1e-4)
    assert result["pmi_context_mean"] == pytest.approx(np.mean(context), abs=1e-4)
    assert result["n"] == 5 and result["labelled"] == 5
    assert result["accuracy"] == np.mean(
        [is_correct(t, str(i)) for i, t in enumerate(result["answers"])]
    )


def test_other_prompts_never_self_and_distinct():
    others = other_prompts(10, 4, seed=3)
    assert others.shape == (10, 4)
    for i, row in enumerate(others):
        assert i not in row and len(set(row.tolist())) == 4 and row.max() < 10
    assert other_prompts(3, 5, seed=0).shape == (3, 2)  # k is capped at n - 1
    # Each column a permutation: every prompt hosts one answer a column (scored once for all)
    for column in others.T:
        assert sorted(column.tolist()) == list(range(10))
    assert not np.array_equal(others, other_prompts(10, 4, seed=4))  # a seeded draw


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1]], 2) == 0.0


def test_markdown_table_with_change_column():
    base = {
        "accuracy": 0.25,
        "pmi_mean": 1.0,
        "pmi_ci95": [0.5, 1.5],
        "length_mean": 10.0,
        "distinct_2": 0.5,
        "finished_rate": 1.0,
    }
    mipo = {**base, "accuracy": 0.5, "pmi_mean": 2.0, "pmi_ci95": [1.5, 2.5]}
    table = markdown_table({"base": base, "mipo": mipo})
    assert "| accuracy | 0.250 | 0.500 | +0.250 |" in table
    assert "| PMI (nats) | 1.00 [0.50, 1.50] | 2.00 [1.50, 2.50] | +1.00 |" in table


def test_evaluate_cli_on_tiny_model(toy_model_dir, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    rows = [
        {"prompt": f"Tom has {i} apples. How many?", "answer": str(i), "task": "add"}
        for i in range(6)
    ]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable,
        "-m",
        "mipo_mlx.evaluate",
        "--model",
        str(toy_model_dir),
        "--prompts",
        str(heldout),
        "--output",
        str(tmp_path / "ev"),
        "--evaluation.max_tokens",
        "6",
        "--evaluation.pmi_negatives",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())["base"]
    assert result["n"] == 6 and result["labelled"] == 6
    check_report(result, [r["answer"] for r in rows])
    assert (tmp_path / "ev" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| PMI (nats) |" in (tmp_path / "ev" / "eval.md").read_text()

    # A second evaluation into the same folder writes eval-2.*, never over the first report.
    first = {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()}
    done = subprocess.run([*cmd, "--limit", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir() if p.name in first} == first
    assert json.loads((tmp_path / "ev" / "eval-2.json").read_text())["base"]["n"] == 2
    assert (tmp_path / "ev" / "eval-2.md").is_file() and (tmp_path / "ev" / "eval-2.png").is_file()
    assert f"wrote {tmp_path / 'ev' / 'eval-2.json'}" in done.stdout

    # While another process holds the folder (a run still training there), evaluate refuses.
    from mipo_mlx.core.files import folder_lock

    with folder_lock(tmp_path / "ev"):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'ev'}: in use by")
    assert not (tmp_path / "ev" / "eval-3.json").exists()


# ---------------------------------------------------------------- compliance


def requirement_prompt(where, question, topic, *requirements):
    from mipo_mlx.data.prompts import Prompt
    from mipo_mlx.data.tasks.requirements import Item, Requirement

    item = Item(question, topic, tuple(Requirement(*r) for r in requirements))
    row = item.row()
    extra = {k: v for k, v in row.items() if k not in ("prompt", "context")}
    return Prompt(where, row["prompt"], row["context"], extra=extra)


def test_compliance_on_written_out_answers():
    """Item 1 (capitals, question): met both. Item 2 (no_commas, max_words 8): met the first
    only (11 words). Item 3 (signoff): the sign-off is there but the text is broken ('aaaa'),
    so it meets none. A math row has no requirements and no score."""
    from mipo_mlx.data.prompts import Prompt
    from mipo_mlx.stages.metrics import add_compliance_win_rate, compliance_metrics

    prompts = [
        requirement_prompt(
            "h:1", "What is a good breakfast?", "breakfast", ("capitals",), ("question",)
        ),
        requirement_prompt("h:2", "How do I cook rice?", "rice", ("max_words", 8), ("no_commas",)),
        requirement_prompt("h:3", "How do I cook rice?", "rice", ("signoff",)),
        Prompt("h:4", "What is 2 + 2?", extra={"answer": "4"}),
    ]
    texts = [
        "OATMEAL IS A GOOD BREAKFAST. WHAT DO YOU EAT?",
        "Rinse the rice and boil it in water for ten minutes.",
        "Rice aaaa rice is good. Hope this helps!",
        "2 + 2 = 4. The answer is 4.",
    ]
    got = compliance_metrics(prompts, texts)
    assert got["compliance_scores"] == [1.0, 0.5, 0.0, None]
    assert got["compliance"] == pytest.approx(0.5)
    assert got["compliance_by_kind"] == {
        "capitals": 1.0,
        "signoff": 0.0,
        "max_words": 0.0,
        "question": 1.0,
        "no_commas": 1.0,
    }
    assert got["well_formed_rate"] == pytest.approx(2 / 3)
    assert compliance_metrics(prompts[3:], texts[3:]) == {}
    results = {"base": got, "mipo": {**got, "compliance_scores": [0.5, 0.5, 1.0, None]}}
    add_compliance_win_rate(results)
    assert results["mipo"]["compliance_win_rate"] == pytest.approx(2 / 3)  # 0.5<1, 0.5>=0.5, 1>=0
    table = markdown_table({"base": {**got}, "mipo": {**got}})
    assert "| compliance (well-formed answers) | 0.500 | 0.500 | +0.000 |" in table
    assert "| compliance: capitals | 1.000 | 1.000 | +0.000 |" in table
    assert table.index("compliance: capitals") < table.index("compliance: signoff")


def test_context_pmi_over_the_rows_with_a_context():
    """Rows 0 and 2 have a context (their context-free prompts start with token 3), row 1 has
    none: the context PMI covers rows 0 and 2 only; the PMI covers all three."""
    table = [[2.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 2.0, -1.0], [0.5] * 4]
    prompts, plain = [[0, 3], [1, 3], [2, 3]], [[3, 3], None, [3, 3]]
    answers = [[0, 0], [1, 3], [2, 1]]
    pmi, context, _ = pmi_scores(
        FirstTokenModel(table), prompts, answers, k=2, seed=0, pad=3, plain_ids=plain
    )
    lp = lambda i, j: sum(log_softmax(table[j])[t] for t in answers[i])  # noqa: E731
    assert pmi.shape == (3,) and context.shape == (2,)
    np.testing.assert_allclose(context, [lp(0, 0) - lp(0, 3), lp(2, 2) - lp(2, 3)], atol=1e-5)


def test_answer_and_measure_scores_compliance_of_its_answers(toy_model):
    """On requirement rows the stage's compliance equals the checkers run on its own answers."""
    from contextlib import nullcontext

    from mipo_mlx.core.config import DataConfig, EvaluationConfig
    from mipo_mlx.data.tasks.requirements import items
    from mipo_mlx.stages.evaluation import answer_and_measure, heldout

    model, tokenizer = toy_model
    prompts = [
        requirement_prompt(
            f"h:{n}", it.question, it.topic, *((r.kind, r.value) for r in it.requirements)
        )
        for n, it in enumerate(items("heldout", 6, seed=1))
    ]
    data, ev = DataConfig(), EvaluationConfig(max_tokens=8, pmi_negatives=2, temperature=1.0)
    result = answer_and_measure(
        model, tokenizer, heldout(tokenizer, prompts, data, "h"), ev, data, 4, nullcontext, "base"
    )
    check_report(result, prompts=prompts)
    assert len(result["compliance_scores"]) == 6 and "pmi_context_mean" in result


def test_best_of_k_at_inference_keeps_the_answer_with_the_highest_base_context_pmi(toy_model):
    """evaluation.best_of = 3: each prompt's 3 samples (sample j from stream i + j *
    SAMPLE_STRIDE) are ranked by the base's context PMI, scored here one row at a time, and the
    report holds the best one; the adapters' KL is 0 for the base and the objective is the mean
    context PMI of the answers kept."""
    from contextlib import nullcontext

    from mipo_mlx.core.config import DataConfig, EvaluationConfig
    from mipo_mlx.data.prompts import Prompt
    from mipo_mlx.engine.generation import decode
    from mipo_mlx.engine.scoring import response_logps
    from mipo_mlx.engine.selection import sample_answers
    from mipo_mlx.stages.evaluation import answer_and_measure, heldout, sampling
    from mipo_mlx.stages.metrics import context_free_ids

    model, tokenizer = toy_model
    prompts = [
        Prompt(f"p.jsonl:{i}", f"Tom has {i} apples. How many?", c)
        for i, c in enumerate(["Be brief.", "Use numbers.", "Be polite.", "One line."])
    ]
    data = DataConfig()
    ev = EvaluationConfig(max_tokens=6, pmi_negatives=1, seed=3, temperature=1.0, best_of=3)
    held = heldout(tokenizer, prompts, data, "p.jsonl")
    result = answer_and_measure(model, tokenizer, held, ev, data, 4, nullcontext, "base")
    ids, plain = held.rendered.ids, context_free_ids(tokenizer, held.rendered, data)
    samples = sample_answers(model, tokenizer, ids, 3, sampling(ev, 4), "again")
    one = lambda prompt, answer: response_logps(model, [prompt], [answer], 0)[0]  # noqa: E731
    best = []
    for i, answers in enumerate(samples):
        pmi = [one(ids[i], a.token_ids) - one(plain[i], a.token_ids) for a in answers]
        best.append(answers[int(np.argmax(pmi))])
    assert result["answers"] == [decode(tokenizer, a) for a in best]
    assert len({decode(tokenizer, a) for s in samples for a in s}) > len(samples)  # they differ
    context = [one(ids[i], a.token_ids) - one(plain[i], a.token_ids) for i, a in enumerate(best)]
    assert result["kl_mean"] == 0.0
    assert result["objective"] == pytest.approx(np.mean(context), abs=1e-4)
