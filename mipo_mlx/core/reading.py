"""The one reader of every file the package reads: settings, prompts, datasets, pairs, answers.

Every input passes the same checks before anything parses, tokenises or loads it:
  the path   a regular file (stat before open, opened with O_NONBLOCK): a folder, FIFO,
             device or socket is refused in one line and nothing blocks or reads forever.
  the bytes  UTF-8 (a leading BOM is dropped); invalid UTF-8, a NUL byte or a lone surrogate,
             JSON's "\\ud800" escape included, is one line naming the file and line.
  the lines  \\n, \\r\\n and \\r all end a line; a line over MAX_LINE_BYTES is refused
             at its number before it is parsed (a row that long is no prompt, and a
             tokenizer would spend minutes and gigabytes on it).
  the size   a file read whole (a YAML config, a JSON list) is capped; JSON values nest
             at most MAX_DEPTH deep.
  YAML       safe and strict: a duplicate key or section names both lines; tags other than
             YAML's own stay refused.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 16 * 2**20  # a row (pair, answer, prompt) is far shorter
MAX_CONFIG_BYTES = 2**20  # a settings file
MAX_JSON_BYTES = 2**30  # a .json list of rows, read whole
MAX_DEPTH = 64  # JSON nesting; rows nest 4 deep
CHUNK = 2**20
_EOL = re.compile(rb"\r\n|\r|\n")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_KINDS = (
    (stat.S_ISDIR, "is a folder"),
    (stat.S_ISFIFO, "is a FIFO (named pipe)"),
    (stat.S_ISCHR, "is a device"),
    (stat.S_ISBLK, "is a device"),
    (stat.S_ISSOCK, "is a socket"),
)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n} bytes"


def _not_regular(path: Path, mode: int, what: str) -> UserError:
    kind = next((says for test, says in _KINDS if test(mode)), "is not a regular file")
    return UserError(f"{path}: {kind}, not a {what} file; give the path of a file")


def open_file(path: str | Path, what: str) -> int:
    """A descriptor of `path` opened for reading, once it is known to be a regular file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} file ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped for something else between the stat and the open
        os.close(fd)
        raise _not_regular(path, mode, what)
    return fd


def decode(raw: bytes, where: str) -> str:
    """One line (or file) as text; `where` is 'file:line'."""
    if b"\x00" in raw:
        raise UserError(f"{where}: holds a NUL byte, so it is not text; re-save the file as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text; re-save the file as UTF-8") from None


def raw_lines(
    path: str | Path, what: str, max_line: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without its line end) for every line of the file, streamed; a line
    over `max_line` bytes (MAX_LINE_BYTES) is refused."""
    max_line = max_line or MAX_LINE_BYTES
    fd = open_file(path, what)
    with os.fdopen(fd, "rb") as fh:
        buffer, number, first = b"", 0, True
        while True:
            chunk = fh.read(CHUNK)
            if first:
                chunk, first = chunk.removeprefix(BOM), False
            buffer += chunk
            start = 0
            for end in _EOL.finditer(buffer):
                if chunk and end.end() == len(buffer) and end.group() == b"\r":
                    break  # its \n may open the next chunk
                number += 1
                _check_length(end.start() - start, max_line, f"{path}:{number}")
                yield number, buffer[start : end.start()]
                start = end.end()
            buffer = buffer[start:]
            _check_length(len(buffer), max_line, f"{path}:{number + 1}")
            if not chunk:
                break
        if buffer:
            yield number + 1, buffer


def _check_length(size: int, max_line: int, where: str) -> None:
    if size > max_line:
        raise UserError(
            f"{where}: line longer than {_size(max_line)}, longer than any the file may hold; "
            "split or shorten it"
        )


def read_text(path: str | Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """A whole small file as text, line ends made \\n."""
    lines = []
    size = 0
    for number, raw in raw_lines(path, what, limit):
        size += len(raw) + 1
        if size > limit:
            raise UserError(f"{path}: larger than {_size(limit)}, too large for a {what} file")
        lines.append(decode(raw, f"{path}:{number}"))
    return "\n".join(lines) + "\n" * bool(lines)


def _check_value(value: Any, where: str) -> None:
    """Refuse lone surrogates (from JSON escapes) and nesting past MAX_DEPTH."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels; flatten it")
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(
                    f"{where}: a \\u escape names a lone surrogate (half of a UTF-16 pair), "
                    "which is no character; write the character itself"
                ) from None


def parse_json(text: str, where: str) -> Any:
    """A JSON value, checked (see `_check_value`); `where` is 'file:line'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f":{err.lineno}" if "\n" in text.rstrip() else ""  # a document of several lines
        raise UserError(
            f"{where}{at}: not valid JSON ({err.msg}); fix or remove the line"
        ) from None
    except ValueError:  # a number of more digits than Python converts
        raise UserError(f"{where}: a number with too many digits; fix or remove the line") from None
    except RecursionError:
        raise UserError(
            f"{where}: JSON nested deeper than {MAX_DEPTH} levels; flatten it"
        ) from None
    # Only a text with that many brackets can nest too deep; most rows skip the walk.
    if text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text):
        _check_value(value, where)
    return value


def json_values(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) for each non-blank line."""
    for number, raw in raw_lines(path, what):
        text = decode(raw, f"{path}:{number}")
        if text.strip():
            yield number, parse_json(text, f"{path}:{number}")


def jsonl_rows(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is no object is refused."""
    for number, value in json_values(path, what):
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: each line must be a JSON object")
        yield number, value


def appended_values(path: str | Path, what: str) -> list[Any]:
    """The JSON lines of a file the package appends to; the last line may be torn by a kill
    mid-write and is then dropped, while a bad line before it is an error."""
    lines = [(n, raw) for n, raw in raw_lines(path, what) if raw.strip()]
    values = []
    for i, (number, raw) in enumerate(lines):
        where = f"{path}:{number}"
        try:
            values.append(parse_json(decode(raw, where), where))
        except UserError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{where}: corrupt line; delete the file to redo this stage") from None
    return values


def starts_with(path: str | Path, what: str, prefix: bytes) -> bool:
    """Whether the file's text, after a BOM and white space, starts with `prefix`."""
    with os.fdopen(open_file(path, what), "rb") as fh:
        head = fh.read(CHUNK).removeprefix(BOM)
        while head and not head.strip():
            head = fh.read(CHUNK)
    return head.lstrip().startswith(prefix)


def read_json(path: str | Path, what: str) -> Any:
    """A whole JSON document (a .json list of rows), checked as a line is."""
    return parse_json(read_text(path, what, MAX_JSON_BYTES), str(path))


def read_json_or_none(path: str | Path, what: str) -> Any:
    """A JSON file the package wrote, or None where it is not one (damaged by hand or by a
    disk fault): the caller says what to do in its own words."""
    try:
        return read_json(path, what)
    except UserError:
        return None


class StrictLoader(yaml.SafeLoader):
    """YAML's safe subset, where a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the constructor reports it
                if first is not None:
                    raise UserError(
                        f"{self.name} line {line}: duplicate key '{key}' (first at line {first});"
                        " keep one of the two"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text (a settings file, or one command-line value) read strictly."""
    loader = None
    try:
        loader = StrictLoader(text)  # its reader refuses non-printable characters here
        loader.name = where
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply; flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()
