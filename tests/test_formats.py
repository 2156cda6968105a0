"""Public dataset formats, sources, subsets and the paper's prompt templates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mipo_mlx.core import files
from mipo_mlx.core.errors import UserError
from mipo_mlx.data.formats import gsm8k_answer, number_text
from mipo_mlx.data.prompts import prompt_row, read_prompts, read_source
from mipo_mlx.data.sources import read_rows
from mipo_mlx.data.templates import GSM8K_EXEMPLARS, render_prompt


def write_jsonl(path: Path, *objs) -> str:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return str(path)


def gsm8k_file(tmp_path, n: int = 3) -> str:
    return write_jsonl(
        tmp_path / "gsm8k_test.jsonl",
        *[{"question": f"Question {i}?", "answer": f"Work {i}.\n#### {i},00{i}"} for i in range(n)],
    )


# ---------------------------------------------------------------- formats


def test_gsm8k_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "g.jsonl",
        {"question": " Tom has 3 apples. How many? ", "answer": "3 * 24 = 72\n#### 72"},
        {"question": "Big?", "answer": "Sum.\n#### 1,234"},
    )
    assert read_rows(path, "gsm8k") == [
        {"prompt": "Tom has 3 apples. How many?", "context": None, "answer": "72", "id": "gsm8k-0"},
        {"prompt": "Big?", "context": None, "answer": "1234", "id": "gsm8k-1"},
    ]


def test_answer_parsing():
    assert gsm8k_answer("a #### 1 #### 1,234", "f:1") == "1234"
    assert gsm8k_answer("x\n####  -5", "f:1") == "-5"
    assert number_text(8.0, "f:1", "Answer") == "8"
    assert number_text(2.5, "f:1", "Answer") == "2.5"
    assert number_text("3.50", "f:1", "Answer") == "3.5"
    assert number_text(12, "f:1", "Answer") == "12"


def test_svamp_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "svamp.jsonl",
        {
            "ID": "chal-1",
            "Body": " Jack had 8 pens. He gave 3 away. ",
            "Question": " How many are left? ",
            "Answer": 5.0,
        },
        {"Body": "A box has 2.5 kg.", "Question": "How much in 2 boxes?", "Answer": "5"},
    )
    assert read_rows(path, "svamp") == [
        {
            "prompt": "Jack had 8 pens. He gave 3 away. How many are left?",
            "context": None,
            "answer": "5",
            "id": "chal-1",
            "incomplete": "How many are left?",
        },
        {
            "prompt": "A box has 2.5 kg. How much in 2 boxes?",
            "context": None,
            "answer": "5",
            "id": "svamp-1",
            "incomplete": "How much in 2 boxes?",
        },
    ]


ARC_PROMPT = "Which is a gas?\nA) ice\nB) steam\nC) rock"


def test_arc_nested_and_flattened(tmp_path):
    nested = write_jsonl(
        tmp_path / "arc.jsonl",
        {
            "id": "Mercury_1",
            "answerKey": "B",
            "question": {
                "stem": "Which is a gas?",
                "choices": [
                    {"label": "A", "text": "ice"},
                    {"label": "B", "text": "steam"},
                    {"label": "C", "text": "rock"},
                ],
            },
        },
    )
    flat = tmp_path / "arc.json"
    flat.write_text(
        json.dumps(
            [
                {
                    "id": "Mercury_1",
                    "question": "Which is a gas?",
                    "answerKey": "B",
                    "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
                }
            ]
        ),
        encoding="utf-8",
    )
    expected = [{"prompt": ARC_PROMPT, "context": None, "answer": "B", "id": "Mercury_1"}]
    assert read_rows(nested, "arc") == expected
    assert read_rows(str(flat), "arc") == expected


def test_mmlu_index_and_letter(tmp_path):
    path = write_jsonl(
        tmp_path / "mmlu.jsonl",
        {"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3},
        {"question": "Red?", "choices": ["a", "b", "c", "d"], "answer": "b"},
    )
    rows = read_rows(path, "mmlu")
    assert rows[0] == {
        "prompt": "2+2?\nA) 1\nB) 2\nC) 3\nD) 4",
        "context": None,
        "answer": "D",
        "id": "mmlu-0",
    }
    assert rows[1]["answer"] == "B"


def test_prism_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "prism.jsonl",
        {
            "opening_prompt": "Best pet?",
            "system_string": "I live in a flat.",
            "conversation_id": "c7",
        },
        {"prompt": "Dinner idea?", "request": "Vegetarian only."},
        {"prompt": "Music?", "preferences": ["No jazz.", "Short."]},
    )
    assert read_rows(path, "prism") == [
        {"prompt": "Best pet?", "context": "I live in a flat.", "answer": None, "id": "c7"},
        {"prompt": "Dinner idea?", "context": "Vegetarian only.", "answer": None, "id": "prism-1"},
        {"prompt": "Music?", "context": "No jazz.; Short.", "answer": None, "id": "prism-2"},
    ]


def test_community_alignment_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "ca.jsonl",
        {"prompt": "Plan a trip.", "preference": "I hate flying."},
        {"prompt": "Gift?", "user_preferences": "Cheap."},
        {"first_turn_prompt": "Book?", "context": "Sci-fi fan."},
    )
    rows = read_rows(path, "community_alignment")
    assert [(r["prompt"], r["context"]) for r in rows] == [
        ("Plan a trip.", "I hate flying."),
        ("Gift?", "Cheap."),
        ("Book?", "Sci-fi fan."),
    ]


# ---------------------------------------------------------------- subset, limit, split


def test_subset_is_deterministic_with_seed(tmp_path):
    path = gsm8k_file(tmp_path, 20)
    first = read_rows(path, "gsm8k", subset=5, seed=42)
    assert first == read_rows(path, "gsm8k", subset=5, seed=42)
    assert len({r["id"] for r in first}) == 5
    assert first != read_rows(path, "gsm8k", subset=5, seed=7)
    everything = read_rows(path, "gsm8k")
    assert all(r in everything for r in first)


def test_limit_after_subset(tmp_path):
    path = gsm8k_file(tmp_path, 20)
    assert read_rows(path, "gsm8k", limit=3) == read_rows(path, "gsm8k")[:3]
    assert read_rows(path, "gsm8k", subset=10, limit=4) == read_rows(path, "gsm8k", subset=10)[:4]


def test_split_picks_files_in_a_folder(tmp_path):
    (tmp_path / "main").mkdir()
    write_jsonl(tmp_path / "main" / "train.jsonl", {"question": "T?", "answer": "#### 1"})
    write_jsonl(tmp_path / "main" / "test.jsonl", {"question": "E?", "answer": "#### 2"})
    assert [r["prompt"] for r in read_rows(str(tmp_path), "gsm8k", split="test")] == ["E?"]
    assert len(read_rows(str(tmp_path), "gsm8k")) == 2
    with pytest.raises(UserError, match="no file name contains split 'validation'"):
        read_rows(str(tmp_path), "gsm8k", split="validation")
    # a file named on its own is what the user wants, whatever split a recipe names
    one = next(p for p in tmp_path.rglob("*.jsonl") if "test" in str(p.relative_to(tmp_path)))
    assert [r["prompt"] for r in read_rows(str(one), "gsm8k", split="main/train")] == ["E?"]


def test_hub_id_downloads_with_patterns(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        folder = tmp_path / "snapshot"
        (folder / "main").mkdir(parents=True)
        write_jsonl(folder / "main" / "test.jsonl", {"question": "Q?", "answer": "#### 9"})
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert read_rows("openai/gsm8k", "gsm8k", split="test")[0]["answer"] == "9"
    assert calls == [("openai/gsm8k", "dataset", ["*test*.jsonl", "*test*.json", "*test*.parquet"])]


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UserError, match="pip install pyarrow"):
        read_rows(str(path), "gsm8k")


# ---------------------------------------------------------------- writing


def test_written_rows_read_back_as_prompts(tmp_path):
    """What a run writes to train_prompts.jsonl / eval_prompts.jsonl reads back as the same
    prompts."""
    prompts = read_source(
        write_jsonl(
            tmp_path / "p.jsonl",
            {"prompt": "A?", "request": "Be kind."},
            {"prompt": "B?", "request": "Be brief."},
        ),
        "prism",
    )
    out = tmp_path / "prompts.jsonl"
    files.write_jsonl(out, map(prompt_row, prompts))
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"prompt": "A?", "context": "Be kind.", "id": "prism-0"}  # no label: no key
    prompts = read_prompts(out)
    assert [(p.question, p.context) for p in prompts] == [("A?", "Be kind."), ("B?", "Be brief.")]


# ---------------------------------------------------------------- templates


def test_gsm8k_8shot_template():
    text = render_prompt({"prompt": "What is 2+3?", "context": None}, "gsm8k_8shot")
    assert len(GSM8K_EXEMPLARS) == 8
    assert text.startswith(
        "Question: There are 15 trees in the grove. "
        "Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. "
        "How many trees did the grove workers plant today?\n"
        "Answer: There are 15 trees originally. "
        "Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. #### 6\n\n"
        "Question: If there are 3 cars in the parking lot and 2 more cars arrive, "
        "how many cars are in the parking lot?\n"
        "Answer: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. #### 5\n\n"
    )
    assert text.endswith(
        "Question: Olivia has $23. She bought five bagels for $3 each. "
        "How much money does she have left?\n"
        "Answer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8. #### 8\n\n"
        "Question: What is 2+3?\nAnswer:"
    )
    assert text.count("Question: ") == 9 and text.count(" #### ") == 8


def test_arc_zero_shot_template():
    assert render_prompt({"prompt": ARC_PROMPT, "context": None}, "arc_zero_shot") == (
        "Which is a gas?\nA) ice\nB) steam\nC) rock\n\n"
        "Think step by step, then finish your response with "
        '"The answer is: <X>" where X is the letter of the correct choice.'
    )


def test_prism_templates():
    row = {"prompt": "Best pet?", "context": "I live in a flat."}
    assert render_prompt(row, "prism") == (
        "Give me short 2-3 sentence answers to the following prompt: Best pet? "
        "Please respect the following requirements made by the user: I live in a flat. "
        "Respond with short 2-3 sentences."
    )
    free = (
        "Give me short 2-3 sentence answers to the following prompt: Best pet? "
        "Respond with short 2-3 sentences."
    )
    assert render_prompt(row, "prism_no_context") == free
    assert render_prompt({"prompt": "Best pet?", "context": None}, "prism") == free


# ---------------------------------------------------------------- bad inputs


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "A?", "answer": "#### 1"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        read_rows(str(path), "gsm8k")


def test_missing_key_is_named(tmp_path):
    path = write_jsonl(
        tmp_path / "g.jsonl", {"question": "A?", "answer": "#### 1"}, {"question": "B?"}
    )
    with pytest.raises(UserError, match=r"g\.jsonl:2: missing key 'answer' \(gsm8k format\)"):
        read_rows(path, "gsm8k")
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "A?"})
    with pytest.raises(
        UserError, match=r"p\.jsonl:1: missing key 'request' or 'preferences' or 'system_string'"
    ):
        read_rows(path, "prism")


def test_unknown_format_and_template(tmp_path):
    with pytest.raises(UserError, match=r"unknown format 'gsm9k'; use one of: gsm8k, svamp"):
        read_rows(gsm8k_file(tmp_path), "gsm9k")
    with pytest.raises(UserError, match="unknown template 'cot'"):
        render_prompt({"prompt": "x", "context": None}, "cot")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "A?", "answer": "no hashes"},
            r"g\.jsonl:1: key 'answer' has no '#### <number>'",
        ),
        ({"question": "A?", "answer": "#### seven"}, r"g\.jsonl:1: key 'answer' is not a number"),
        (
            {"question": "", "answer": "#### 1"},
            r"g\.jsonl:1: key 'question' must be a non-empty string",
        ),
    ],
)
def test_bad_gsm8k_values(tmp_path, row, message):
    with pytest.raises(UserError, match=message):
        read_rows(write_jsonl(tmp_path / "g.jsonl", row), "gsm8k")


def test_bad_arc_and_mmlu_rows(tmp_path):
    arc = write_jsonl(
        tmp_path / "arc.jsonl",
        {"question": "Q?", "answerKey": "E", "choices": {"text": ["x", "y"], "label": ["A", "B"]}},
    )
    with pytest.raises(
        UserError, match=r"arc\.jsonl:1: answerKey 'E' is not one of the choice labels"
    ):
        read_rows(arc, "arc")
    mmlu = write_jsonl(
        tmp_path / "mmlu.jsonl", {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 4}
    )
    with pytest.raises(UserError, match=r"mmlu\.jsonl:1: key 'answer' must be an index 0-3"):
        read_rows(mmlu, "mmlu")


def test_bad_sources_and_counts(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: file not found"):
        read_rows(str(tmp_path / "missing.jsonl"), "gsm8k")
    listed = tmp_path / "list.json"
    listed.write_text('[{"question": "A?", "answer": "#### 1"}, 3]', encoding="utf-8")
    with pytest.raises(UserError, match=r"list\.json: row 2 of the list is not a JSON object"):
        read_rows(str(listed), "gsm8k")
    path = gsm8k_file(tmp_path, 3)
    with pytest.raises(UserError, match="subset=5 but the source has 3 rows"):
        read_rows(path, "gsm8k", subset=5)
    with pytest.raises(UserError, match="limit must be at least 1"):
        read_rows(path, "gsm8k", limit=0)
