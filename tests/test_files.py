"""Atomic writes and checked JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mipo_mlx.core import files
from mipo_mlx.core.errors import UserError
from mipo_mlx.core.files import (
    append_jsonl,
    atomic_folder,
    atomic_path,
    newest_folder,
    partial_and_old,
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
    with pytest.raises(UserError, match=r"is a folder, not a rows file"):
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


def test_atomic_folder_never_touches_a_users_old_or_partial_folder(tmp_path):
    """`m.old/` and `m.partial/` are the user's names: replacing `m` leaves them as they were,
    and leaves nothing of its own beside or inside `m`."""
    target = tmp_path / "m"
    for name in ("m.old", "m.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the user's")
    for text in ("first", "second"):
        with atomic_folder(target) as folder:
            (folder / "data.txt").write_text(text)
    assert (target / "data.txt").read_text() == "second"
    assert sorted(p.name for p in target.iterdir()) == ["data.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old", "m.partial"]
    for name in ("m.old", "m.partial"):
        assert (tmp_path / name / "mine.txt").read_text() == "the user's"


def test_a_kill_between_the_renames_leaves_a_whole_folder_found_then_removed(tmp_path):
    """What a kill between atomic_folder's renames leaves: the previous folder, marked, at the
    `.old` name and no target; a kill before a partial folder's mark leaves it empty."""
    target = tmp_path / "checkpoint"
    with atomic_folder(target) as folder:
        (folder / "step").write_text("1")
    partial, old = partial_and_old(target)
    target.rename(old)
    (old / files.MARK).write_text("")
    partial.mkdir()
    assert newest_folder(target) == old and (old / "step").read_text() == "1"
    with atomic_folder(target) as folder:
        (folder / "step").write_text("2")
    assert (target / "step").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert newest_folder(tmp_path / "absent") is None


@pytest.mark.parametrize("which", [0, 1])
def test_an_unmarked_folder_under_a_temporary_name_is_refused_and_kept(tmp_path, which):
    target = tmp_path / "m"
    target.mkdir()
    (target / "data.txt").write_text("before")
    taken = partial_and_old(target)[which]
    taken.mkdir()
    (taken / "mine.txt").write_text("the user's")
    with pytest.raises(UserError, match="not a folder mipo_mlx wrote"):
        with atomic_folder(target) as folder:
            (folder / "data.txt").write_text("after")
    assert (taken / "mine.txt").read_text() == "the user's"
    assert (target / "data.txt").read_text() == "before"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", taken.name])


def test_output_place_refuses_nothing_the_working_directory_and_the_model_folder(
    tmp_path, monkeypatch
):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    refused = {
        "": "output.dir is empty (the working directory)",
        ".": "output.dir .: is the working directory",
        str(model): "is the model folder",
        "models/base/run": "is inside the model folder",
        "models": "holds the model folder",
    }
    for given, fragment in refused.items():
        with pytest.raises(UserError) as err:
            files.check_output_place(Path(given), given, "output.dir", str(model))
        assert fragment in str(err.value) and "\n" not in str(err.value)
    for given in ("run", "models/base-run", "models/other/run"):  # beside the model: fine
        files.check_output_place(Path(given), given, "output.dir", str(model))
    files.check_output_place(Path("run"), "run", "output.dir", "org/hub-model")


def test_lock_of_a_replaced_folder_lies_beside_it_and_names_its_holder(tmp_path):
    target = tmp_path / "new" / "fused"
    with files.folder_lock(target, "--output", replaced=True):
        assert not target.exists()  # atomic_folder makes it
        assert [p.name for p in target.parent.iterdir()] == [".fused.mipo_mlx.lock"]
        with pytest.raises(UserError) as err:
            with files.folder_lock(target, "--output", replaced=True):
                pass
        assert f"{target}: in use by process" in str(err.value)
        assert "choose another --output" in str(err.value)
    assert not (tmp_path / "new").exists()  # nothing left of the lock, nor the folder it made
