"""Atomic writes and checked JSONL."""

from __future__ import annotations

import json

import pytest

from mipo_mlx.errors import UserError
from mipo_mlx.files import (
    append_jsonl,
    atomic_path,
    read_jsonl,
    write_json,
    write_jsonl,
    write_text,
)


def test_write_text_replaces_content(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old content that is longer than the new one\n", encoding="utf-8")
    write_text(target, "new ✓\n")
    assert target.read_bytes() == "new ✓\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_write_text_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    write_text(target, "x")
    assert target.read_text() == "x"
    assert [p.name for p in target.parent.iterdir()] == ["c.txt"]


def test_atomic_path_yields_a_temp_file_beside_the_target(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp != target
        assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert not tmp.exists()


def test_failure_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "pairs.jsonl"
    target.write_bytes(b'{"old": true}\n')
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b'{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_failure_inside_atomic_path_without_old_file(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_failure_mid_stream_keeps_old_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    write_jsonl(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise KeyError("boom")

    with pytest.raises(KeyError):
        write_jsonl(target, rows())
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_write_json(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"name": "café", "n": [1, 2]})
    assert (
        target.read_text(encoding="utf-8")
        == '{\n  "name": "café",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    )


def test_write_jsonl_read_jsonl_round_trip(tmp_path):
    target = tmp_path / "rows.jsonl"
    data = [{"a": 1}, {"b": "ü\nnewline"}, {"c": [None, True, 1.5]}]
    write_jsonl(target, data)
    assert list(read_jsonl(target)) == [(1, data[0]), (2, data[1]), (3, data[2])]


def test_append_jsonl_read_jsonl_round_trip(tmp_path):
    target = tmp_path / "metrics.jsonl"
    data = [{"step": i, "loss": 0.5 / (i + 1), "note": "ß"} for i in range(4)]
    for row in data:
        append_jsonl(target, row)
    assert list(read_jsonl(target)) == list(enumerate(data, start=1))
    text = target.read_text(encoding="utf-8")
    assert text.count("\n") == 4 and text.endswith("\n")
    assert json.loads(text.splitlines()[0]) == data[0]


def test_append_jsonl_appends_to_existing(tmp_path):
    target = tmp_path / "m.jsonl"
    target.write_text('{"x": 0}\n', encoding="utf-8")
    append_jsonl(target, {"x": 1})
    assert target.read_text() == '{"x": 0}\n{"x": 1}\n'


def test_read_jsonl_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as err:
        list(read_jsonl(missing))
    assert str(err.value) == f"{missing}: rows file not found"
    with pytest.raises(UserError) as err:
        list(read_jsonl(missing, "pairs"))
    assert str(err.value) == f"{missing}: pairs file not found"


def test_read_jsonl_folder_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match=r"rows file not found"):
        list(read_jsonl(tmp_path))


def test_read_jsonl_skips_blank_lines(tmp_path):
    target = tmp_path / "r.jsonl"
    target.write_text('\n{"a": 1}\n\n  \r\n{"a": 2}\r\n', encoding="utf-8")
    assert list(read_jsonl(target)) == [(2, {"a": 1}), (5, {"a": 2})]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": 1}\n{"a": \n', ":2: not valid JSON ("),
        (b'{"a": 1}\n[1, 2]\n', ":2: each line must be a JSON object"),
        (b'{"a": 1}\n\n{"a": "\xff"}\n', ":3: not UTF-8 text; re-save the file as UTF-8"),
    ],
)
def test_read_jsonl_bad_line(tmp_path, content, message):
    target = tmp_path / "r.jsonl"
    target.write_bytes(content)
    rows = read_jsonl(target)
    assert next(rows) == (1, {"a": 1})  # good lines before the bad one still come through
    with pytest.raises(UserError) as err:
        next(rows)
    assert str(err.value).startswith(f"{target}{message}")
