"""Property-based: whatever a file or a setting holds, each reader and the settings parser
either accept it or raise a UserError of one line (a command: exit 2 and one line), never
another exception, and the file read is left as it was."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mipo_mlx import train
from mipo_mlx.core import cli
from mipo_mlx.core.config import Config, all_keys, sections, settings_of
from mipo_mlx.core.errors import UserError, reports_user_errors
from mipo_mlx.core.files import read_jsonl, read_lines
from mipo_mlx.core.settings import resolve, validate
from mipo_mlx.data.formats import FORMATS
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.data.prompts import read_prompts
from mipo_mlx.data.sources import read_rows

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Keys every reader looks for, so that rows often come close to valid.
KEYS = [
    *("prompt", "messages", "role", "content", "context", "answer", "task", "topic"),
    *("requirements", "kind", "value", "question", "Body", "Question", "Answer", "choices"),
    *("answerKey", "stem", "label", "text", "opening_prompt", "request", "preference", "id"),
    *("chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "negatives", "source"),
]
ODD_TEXT = st.sampled_from(["\ud800", "a\udfff", "\x00", "user", "A", "72", "tea", "#### 3", ""])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    ODD_TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)
ROWS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)
NOISE = st.sampled_from(
    [b"\xef\xbb\xbf", b"\r", b"\r\n", b"\n", b"\x00", b"\xff", b"\xed\xa0\x80", b"[" * 70]
)
LINES = st.lists(
    st.one_of(ROWS.map(lambda r: json.dumps(r).encode()), st.binary(max_size=20), NOISE),
    max_size=8,
)
FILES = LINES.map(lambda parts: b"\n".join(parts))


def text_of(value):
    """Every string inside what a reader returned (rows, prompts, pairs)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from text_of(k)
            yield from text_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from text_of(v)
    elif hasattr(value, "__dataclass_fields__"):
        yield from text_of(vars(value))


def holds(call, *args) -> None:
    """`call` works and returns only text a tokenizer can take (no lone surrogate), or raises
    a UserError of one line."""
    try:
        result = call(*args)
    except UserError as err:
        assert "\n" not in str(err) and str(err)
        return
    for text in text_of(result):
        text.encode("utf-8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


def readers(path):
    """Every reader of a row file, as a callable of nothing."""
    yield lambda: list(read_jsonl(path))
    yield lambda: read_prompts(path)
    yield lambda: read_pairs(path, vocab=100)
    yield lambda: read_lines(path)
    for fmt in FORMATS:
        yield lambda fmt=fmt: read_rows(str(path), fmt)


@FAST
@given(content=FILES)
def test_row_readers_accept_or_refuse_in_one_line(folder, content):
    for name in ("rows.jsonl", "rows.json"):
        path = folder / name
        path.write_bytes(content)
        for read in readers(path):
            holds(read)
        assert path.read_bytes() == content


@FAST
@given(rows=st.lists(ROWS, max_size=5))
def test_json_list_files_accept_or_refuse_in_one_line(folder, rows):
    path = folder / "list.json"
    content = ("\ufeff" + json.dumps(rows, indent=1)).encode("utf-8", "surrogatepass")
    path.write_bytes(content)
    for fmt in FORMATS:
        holds(read_rows, str(path), fmt)
    assert path.read_bytes() == content


SETTING_VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.sampled_from(["{prompt:>5}", "{0}", "{prompt!r}"])
)
SECTION_KEYS = st.sampled_from(all_keys())


def yaml_documents():
    """Settings files: sections and keys as the code knows them, with any values, or any text."""
    entry = st.tuples(SECTION_KEYS, SETTING_VALUES)
    structured = st.lists(entry, max_size=5).map(
        lambda pairs: "".join(
            f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {json.dumps(value)}\n"
            for key, value in pairs
        )
    )
    return st.one_of(structured, st.text(alphabet=string.printable + "\ud800\x00\t", max_size=60))


@FAST
@given(text=yaml_documents())
def test_settings_files_accept_or_refuse_in_one_line(folder, text):
    path = folder / "config.yaml"
    content = text.encode("utf-8", "surrogatepass")
    path.write_bytes(content)
    holds(lambda: validate(resolve(str(path), {"model.path": "m", "data.prompts": "p"})))
    assert path.read_bytes() == content


@FAST
@given(
    options=st.lists(
        st.tuples(SECTION_KEYS, st.text(max_size=12) | ODD_TEXT | st.sampled_from(["-1", "1e999"])),
        max_size=4,
    )
)
def test_command_line_values_exit_2_with_one_line(capsys, options):
    @reports_user_errors
    def main(argv):
        yaml_path, overrides, _ = cli.parse_args(train.parser(), argv)
        validate(resolve(yaml_path, overrides))

    argv = ["--model", "m", "--prompts", "p"] + [a for k, v in options for a in (f"--{k}", v)]
    assert main(argv) in (0, 2)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) <= 1 and all(line.startswith("error: ") for line in said)


FIELDS = [(s, name) for s, cls in sections().items() for name in settings_of(cls)]


@FAST
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS), SETTING_VALUES), max_size=4))
def test_python_api_settings_are_checked_as_the_command_line_is(changes):
    config = Config()
    config.model.path, config.data.prompts = "m", "p"
    for (section, name), value in changes:
        setattr(getattr(config, section), name, value)
    holds(validate, config)
