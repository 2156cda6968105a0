"""The one reader: encodings, line ends, special files, sizes and nesting, strict YAML, and the
labels checked as rows are read. Every reader of the package is reached through it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mipo_mlx.core import reading
from mipo_mlx.core.config import DataConfig
from mipo_mlx.core.errors import UserError
from mipo_mlx.core.files import read_jsonl, read_lines
from mipo_mlx.core.settings import load_yaml
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.data.prompts import Prompt, read_prompts, render_prompts
from mipo_mlx.data.sources import read_rows


def one_line_error(call, *args) -> str:
    with pytest.raises(UserError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- encodings and line ends


def test_bom_and_every_line_end_work_for_prompts_datasets_and_config(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r{"prompt": "b"}\r\n\r\n{"prompt": "c"}')
    assert [(p.where, p.question) for p in read_prompts(prompts)] == [
        (f"{prompts}:1", "a"),
        (f"{prompts}:2", "b"),
        (f"{prompts}:4", "c"),
    ]
    listed = tmp_path / "g.json"
    listed.write_bytes(b'\xef\xbb\xbf [{"question": "A?", "answer": "#### 1"}]\r\n')
    assert read_rows(str(listed), "gsm8k")[0]["answer"] == "1"
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbftraining:\r\n  beta: 0.2\r  epochs: 2\r\n")
    assert load_yaml(config) == {"training.beta": 0.2, "training.epochs": 2}


def test_a_crlf_split_between_chunks_is_one_line_end(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK", 4)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a":1}\r\n{"a":2}\r\r{"a":3}')  # \r at the end of the second chunk
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (2, {"a": 2}), (4, {"a": 3})]


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"prompt": "a"}\n{"prompt": "b\\ud800"}\n', ":2: a \\u escape names a lone surrogate"),
        (b'{"prompt": "a"}\n{"prompt": "\\uDFFF b"}\n', ":2: a \\u escape names a lone surrogate"),
        (b'{"prompt": "a"}\n{"prompt": "b\x00"}\n', ":2: holds a NUL byte"),
        (b'{"prompt": "a"}\n{"prompt": "\xed\xa0\x80"}\n', ":2: not UTF-8 text"),
        (b'{"prompt": "a"}\r{"prompt": "caf\xe9"}\n', ":2: not UTF-8 text"),
        (b'\xff\xfe{\x00"\x00', ":1: holds a NUL byte"),  # UTF-16
        (b'{"prompt": "a", "n": 1' + b"0" * 5000 + b"}\n", ":1: a number with too many digits"),
    ],
)
def test_text_that_is_no_text_is_one_line_naming_the_line(tmp_path, content, fragment):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    assert one_line_error(read_prompts, path).startswith(f"{path}{fragment}")


def test_a_surrogate_pair_escape_is_one_character(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a \\ud83d\\ude00"}\n{"prompt": "b"}\n', encoding="utf-8")
    assert read_prompts(path)[0].question == "a \U0001f600"


# ---------------------------------------------------------------- special files


def special_files(tmp_path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"FIFO": fifo, "device": Path("/dev/zero"), "folder": tmp_path}


@pytest.mark.parametrize("kind", ["FIFO", "device", "folder"])
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    path = special_files(tmp_path)[kind]
    says = {"FIFO": "is a FIFO", "device": "is a device", "folder": "is a folder"}[kind]
    for call in (load_yaml, read_prompts, read_pairs, lambda p: list(read_jsonl(p))):
        assert says in one_line_error(call, path)
    assert says in one_line_error(read_lines, path)
    for name in ("d.json", "d.parquet"):
        target = tmp_path / name
        os.mkfifo(target)
        assert "is a FIFO" in one_line_error(read_rows, str(target), "gsm8k")


# ---------------------------------------------------------------- sizes and nesting


def test_a_too_long_line_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "' + "x" * 5000 + '"}\n', encoding="utf-8")
    assert one_line_error(read_prompts, path).startswith(f"{path}:2: line longer than 1000 bytes")


def test_config_file_size_is_capped(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * reading.MAX_CONFIG_BYTES + "\n", encoding="utf-8")
    assert one_line_error(load_yaml, path).startswith(f"{path}:1: line longer than 1 MiB")


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deep_json_is_refused(tmp_path, depth):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "x": ' + "[" * depth + "]" * depth + "}\n")
    assert "nested deeper than 64 levels" in one_line_error(read_prompts, path)


def test_deep_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: " + "[" * 50_000 + "\n")
    assert one_line_error(load_yaml, path).startswith(f"{path}")


# ---------------------------------------------------------------- strict YAML


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "training:\n  beta: 0.2\n  epochs: 1\n  beta: 0.3\n",
            "line 4: duplicate key 'beta' (first at line 2); keep one of the two",
        ),
        (
            "training:\n  beta: 0.2\nlora:\n  rank: 4\ntraining:\n  epochs: 2\n",
            "line 5: duplicate key 'training' (first at line 1); keep one of the two",
        ),
        ("lora: {rank: 4, rank: 8}\n", "line 1: duplicate key 'rank' (first at line 1)"),
        ("training: !!python/object:os.system {}\n", "line 1: not valid YAML (could not"),
        ("training: !custom 3\n", "line 1: not valid YAML (could not"),
    ],
)
def test_yaml_is_strict(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    assert one_line_error(load_yaml, path).startswith(f"{path} {message}")


def test_yaml_merge_keys_still_work():
    assert reading.parse_yaml("a: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n", "t") == {
        "a": {"x": 1},
        "c": {"x": 2},
    }


# ---------------------------------------------------------------- appended files


def test_a_torn_last_line_is_dropped_and_a_bad_earlier_line_is_an_error(tmp_path):
    path = tmp_path / "responses.chosen.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b": "caf\xc3')
    assert read_lines(path) == [{"a": 1}, {"a": 2}]
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')
    assert one_line_error(read_lines, path) == (
        f"{path}:2: corrupt line; delete the file to redo this stage"
    )
    assert read_lines(tmp_path / "none.jsonl") == []


# ---------------------------------------------------------------- labels, checked when read


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"answer": [1]}, "'answer' must be a number or a choice letter A-E"),
        ({"answer": "seventy"}, "'answer' must be a number or a choice letter A-E"),
        ({"answer": " 72"}, "'answer' must be a number or a choice letter A-E"),
        ({"answer": True}, "got a bool"),
        ({"answer": "F"}, "got 'F'"),
        ({"task": ""}, "'task' must be a non-empty string"),
        ({"requirements": [], "topic": "tea"}, "'requirements' must be a non-empty list"),
        ({"requirements": [{"kind": "shout", "value": None}], "topic": "tea"}, "unknown"),
        ({"requirements": [{"kind": "max_words", "value": "8"}], "topic": "tea"}, "takes a"),
        ({"requirements": [{"kind": "question", "value": None}]}, "'topic' must name one"),
        ({"requirements": [{"kind": "question", "value": None}], "topic": "x"}, "'topic'"),
    ],
)
def test_malformed_labels_are_refused_as_the_file_is_read(tmp_path, extra, fragment):
    path = tmp_path / "heldout.jsonl"
    rows = [{"prompt": "a"}, {"prompt": "b", **extra}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    message = one_line_error(read_prompts, path)
    assert message.startswith(f"{path}:2: ") and fragment in message


def test_good_labels_pass(tmp_path):
    path = tmp_path / "heldout.jsonl"
    answers = ["72", "-3", "1,234", "2.5", 8, 8.0, "B", "c"]
    rows = [{"prompt": f"q{i}", "answer": a, "task": "add"} for i, a in enumerate(answers)]
    rows.append(
        {
            "prompt": "Tea?",
            "topic": "tea",
            "requirements": [
                {"kind": "max_words", "value": 8},
                {"kind": "question", "value": None},
            ],
        }
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert len(read_prompts(path)) == len(rows)


# ---------------------------------------------------------------- long prompts


class CountingTokenizer:
    """Counts the characters it is asked to tokenise: a token per character."""

    chat_template = "plain"

    def __init__(self):
        self.chars = 0

    def apply_chat_template(self, messages, add_generation_prompt, enable_thinking):
        text = "".join(m["content"] for m in messages)
        self.chars += len(text)
        return list(range(len(text)))


def test_a_prompt_too_long_to_fit_is_skipped_without_tokenising_it():
    prompts = [Prompt(f"p:{i}", "q" * 10) for i in range(2)] + [Prompt("p:3", "x" * 10**6)]
    tokenizer = CountingTokenizer()
    data = DataConfig(max_prompt_tokens=16)
    rendered = render_prompts(prompts, tokenizer, data, "p")
    assert (len(rendered.prompts), rendered.skipped) == (2, 1)
    assert tokenizer.chars == 20
    data.long_prompts = "error"
    message = one_line_error(render_prompts, prompts, CountingTokenizer(), data, "p")
    assert message.startswith("p:3: prompt has 1000000 characters, more than")
