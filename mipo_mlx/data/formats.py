"""Public dataset formats read into plain rows, and the paper's prompt templates.

A row is `{"prompt": str, "context": str | None, "answer": str | None, "id": str}`.
`answer` holds the label (a number string or a choice letter); only evaluation
reads it. `context` holds a user's stated preferences (personalization formats).
SVAMP rows also carry `incomplete`: the Question alone, the paper's `incomplete`
negative prompt for SVAMP (the Body dropped).

Formats and the keys each reads:
  gsm8k               question, answer ("... #### 72": the number after the last '####')
  svamp               Body, Question, Answer (prompt = Body + " " + Question)
  arc                 question {stem, choices [{label, text}]}, answerKey   (nested, jsonl)
                      question, choices {text: [...], label: [...]}, answerKey  (Hub, flat)
  mmlu                question, choices (2-5 strings, labelled A-E), answer (index or letter)
  prism               prompt | opening_prompt; request | preferences | system_string
  community_alignment prompt | first_turn_prompt | question;
                      preference | user_preferences | preferences | context
The first key of each group that a row holds is used. A context may be a string or
a list of strings (joined with "; "). The row id is the first of id, ID,
question_id, prompt_id, conversation_id, else "<format>-<position in the source>".

Sources: a local .jsonl file, a .json file (a list of rows, or JSON lines), a
.parquet file (needs pyarrow), a folder of those, or a Hugging Face dataset id
(org/name) fetched with `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core import reading
from ..core.errors import UserError
from ..core.files import read_jsonl

Row = dict[str, Any]
Fields = tuple[str, str | None, str | None]  # prompt, context, answer

EXTENSIONS = (".jsonl", ".json", ".parquet")
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
ID_KEYS = ("id", "ID", "question_id", "prompt_id", "conversation_id")
LETTERS = "ABCDE"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# Wei et al. 2022 (chain-of-thought), the eight GSM8K exemplars: (question, reasoning, answer).
GSM8K_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. "
        "How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6.",
        "6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, "
        "how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        "5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. "
        "If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39.",
        "39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8.",
        "8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
        "How many toys does he have now?",
        "Shawn started with 5 toys. "
        "If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9.",
        "9",
    ),
    (
        "There were nine computers in the server room. "
        "Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29.",
        "29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. "
        "On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls.",
        "33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8.",
        "8",
    ),
)

GSM8K_8SHOT_PREFIX = "".join(
    f"Question: {question}\nAnswer: {reasoning} #### {answer}\n\n"
    for question, reasoning, answer in GSM8K_EXEMPLARS
)
ARC_ZERO_SHOT = (
    "{prompt}\n\nThink step by step, then finish your response with "
    '"The answer is: <X>" where X is the letter of the correct choice.'
)
PRISM_WITH_CONTEXT = (
    "Give me short 2-3 sentence answers to the following prompt: {prompt} "
    "Please respect the following requirements made by the user: {context} "
    "Respond with short 2-3 sentences."
)
PRISM_NO_CONTEXT = (
    "Give me short 2-3 sentence answers to the following prompt: {prompt} "
    "Respond with short 2-3 sentences."
)


# ---------------------------------------------------------------- field helpers


def _pick(raw: dict, keys: tuple[str, ...], where: str, fmt: str) -> tuple[str, Any]:
    """The first of `keys` that `raw` holds, as (key, value)."""
    for key in keys:
        if key in raw and raw[key] is not None:
            return key, raw[key]
    names = " or ".join(repr(k) for k in keys)
    raise UserError(
        f"{where}: missing key {names} ({fmt} format); "
        "check data.format (or evaluation.format) and the file"
    )


def _text(raw: dict, keys: tuple[str, ...], where: str, fmt: str) -> str:
    key, value = _pick(raw, keys, where, fmt)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: key '{key}' must be a non-empty string ({fmt} format)")
    return value.strip()


def number_text(value: Any, where: str, key: str) -> str:
    """A numeric label as a plain string: commas removed, '8.0' -> '8', '2.50' -> '2.5'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: key '{key}' must be a number, got {type(value).__name__}")
    text = repr(value) if isinstance(value, float) else str(value)
    text = text.replace(",", "").strip()
    if not _NUMBER.fullmatch(text):
        raise UserError(f"{where}: key '{key}' is not a number: {str(value)[:40]!r}")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def gsm8k_answer(solution: str, where: str) -> str:
    """The number after the last '####' of a GSM8K solution, commas removed."""
    if "####" not in solution:
        raise UserError(f"{where}: key 'answer' has no '#### <number>' line (gsm8k format)")
    return number_text(solution.rsplit("####", 1)[1].strip(), where, "answer")


def _choices_prompt(stem: str, labels: list[str], texts: list[str]) -> str:
    return stem + "\n" + "\n".join(f"{label}) {text}" for label, text in zip(labels, texts))


def _context(raw: dict, keys: tuple[str, ...], where: str, fmt: str) -> str:
    key, value = _pick(raw, keys, where, fmt)
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return "; ".join(v.strip() for v in value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise UserError(
        f"{where}: key '{key}' must be a non-empty string or list of strings ({fmt} format)"
    )


# ---------------------------------------------------------------- formats


def _gsm8k(raw: dict, where: str) -> Fields:
    question = _text(raw, ("question",), where, "gsm8k")
    return question, None, gsm8k_answer(_text(raw, ("answer",), where, "gsm8k"), where)


def _svamp(raw: dict, where: str) -> Fields:
    body = _text(raw, ("Body",), where, "svamp")
    question = _text(raw, ("Question",), where, "svamp")
    _, answer = _pick(raw, ("Answer",), where, "svamp")
    return f"{body} {question}", None, number_text(answer, where, "Answer")


def _arc_choices(question: Any, raw: dict, where: str) -> tuple[str, list[str], list[str]]:
    """(stem, labels, texts) from the nested or the flattened ARC row."""
    if isinstance(question, dict):  # nested: {"stem": ..., "choices": [{"label", "text"}]}
        stem = _text(question, ("stem",), f"{where}: question", "arc")
        choices = question.get("choices")
        if (
            not isinstance(choices, list)
            or not choices
            or not all(
                isinstance(c, dict)
                and isinstance(c.get("label"), str)
                and isinstance(c.get("text"), str)
                for c in choices
            )
        ):
            raise UserError(
                f"{where}: key 'question.choices' must be a list of {{label, text}} (arc format)"
            )
        return stem, [c["label"] for c in choices], [c["text"] for c in choices]
    if not isinstance(question, str) or not question.strip():
        raise UserError(
            f"{where}: key 'question' must be a string or a {{stem, choices}} object (arc format)"
        )
    _, choices = _pick(raw, ("choices",), where, "arc")
    labels = choices.get("label") if isinstance(choices, dict) else None
    texts = choices.get("text") if isinstance(choices, dict) else None
    if not (
        isinstance(labels, list)
        and isinstance(texts, list)
        and labels
        and len(labels) == len(texts)
        and all(isinstance(x, str) for x in labels + texts)
    ):
        raise UserError(
            f'{where}: key \'choices\' must be {{"text": [...], "label": [...]}} '
            "of equal length (arc format)"
        )
    return question.strip(), labels, texts


def _arc(raw: dict, where: str) -> Fields:
    _, question = _pick(raw, ("question",), where, "arc")
    stem, labels, texts = _arc_choices(question, raw, where)
    answer = _text(raw, ("answerKey",), where, "arc")
    if answer not in labels:
        raise UserError(f"{where}: answerKey {answer!r} is not one of the choice labels {labels}")
    return _choices_prompt(stem, labels, texts), None, answer


def _mmlu(raw: dict, where: str) -> Fields:
    question = _text(raw, ("question",), where, "mmlu")
    _, choices = _pick(raw, ("choices",), where, "mmlu")
    if not (
        isinstance(choices, list)
        and 2 <= len(choices) <= len(LETTERS)
        and all(isinstance(c, str) for c in choices)
    ):
        raise UserError(
            f"{where}: key 'choices' must be a list of 2-{len(LETTERS)} strings (mmlu format)"
        )
    labels = list(LETTERS[: len(choices)])
    _, answer = _pick(raw, ("answer",), where, "mmlu")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        letter = labels[answer]
    elif isinstance(answer, str) and answer.strip().upper() in labels:
        letter = answer.strip().upper()
    else:
        raise UserError(
            f"{where}: key 'answer' must be an index 0-{len(choices) - 1} "
            f"or a letter {labels[0]}-{labels[-1]}, got {answer!r}"
        )
    return _choices_prompt(question, labels, choices), None, letter


def _prism(raw: dict, where: str) -> Fields:
    prompt = _text(raw, ("prompt", "opening_prompt"), where, "prism")
    context = _context(raw, ("request", "preferences", "system_string"), where, "prism")
    return prompt, context, None


def _community_alignment(raw: dict, where: str) -> Fields:
    fmt = "community_alignment"
    prompt = _text(raw, ("prompt", "first_turn_prompt", "question"), where, fmt)
    context = _context(
        raw, ("preference", "user_preferences", "preferences", "context"), where, fmt
    )
    return prompt, context, None


FORMATS: dict[str, Callable[[dict, str], Fields]] = {
    "gsm8k": _gsm8k,
    "svamp": _svamp,
    "arc": _arc,
    "mmlu": _mmlu,
    "prism": _prism,
    "community_alignment": _community_alignment,
}


def _row_id(raw: dict, fmt: str, position: int) -> str:
    for key in ID_KEYS:
        value = raw.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return f"{fmt}-{position}"


def normalize_row(raw: dict, format: str, where: str, position: int) -> Row:
    """One public-format record as a plain row; `where` names the file and line for errors."""
    parse = _format_parser(format)
    prompt, context, answer = parse(raw, where)
    row = {
        "prompt": prompt,
        "context": context,
        "answer": answer,
        "id": _row_id(raw, format, position),
    }
    if format == "svamp":
        row["incomplete"] = raw["Question"].strip()
    return row


def _format_parser(format: str) -> Callable[[dict, str], Fields]:
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; use one of: {', '.join(FORMATS)}")
    return FORMATS[format]


# ---------------------------------------------------------------- files


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """A .json file: a list of objects, or JSON lines under a .json name."""
    if not reading.starts_with(path, "dataset", b"["):
        yield from ((f"{path}:{n}", row) for n, row in read_jsonl(path, "dataset"))
        return
    data = reading.read_json(path, "dataset")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {number} of the list is not a JSON object")
        yield f"{path}: row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    os.close(reading.open_file(path, "dataset"))  # a FIFO or device would block pyarrow
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({err}); re-download it") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", row


def _file_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, raw record) for each record of one file."""
    if path.suffix == ".jsonl":
        return ((f"{path}:{n}", row) for n, row in read_jsonl(path, "dataset"))
    if path.suffix == ".json":
        return _json_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise UserError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def _data_files(root: Path) -> list[Path]:
    if not root.is_dir():  # a file, or something posing as one: the reader tells which
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in EXTENSIONS
        and p.name not in METADATA_FILES
        and ".cache" not in p.relative_to(root).parts
    )


def _download(repo_id: str, split: str | None) -> Path:
    from huggingface_hub import snapshot_download

    pattern = f"*{split}*" if split else "*"
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", allow_patterns=[pattern + ext for ext in EXTENSIONS]
        )
    except Exception as err:  # network, auth and not-found errors all end the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{repo_id}: could not download the dataset ({type(err).__name__}: {first}); "
            "check the id and your network, or pass a local file"
        ) from None
    return Path(folder)


def _source_files(source: str, split: str | None) -> list[Path]:
    """The data files of `source` whose path (relative to the source) contains `split`;
    a single file is read as it is (a recipe's split names files of a folder or Hub release)."""
    path = Path(source)
    if path.exists():
        root = path
    elif _HUB_ID.fullmatch(source) and path.suffix not in EXTENSIONS:
        root = _download(source, split)
    else:
        raise UserError(
            f"{source}: file not found; give a .jsonl/.json/.parquet file, "
            "a folder, or a Hugging Face dataset id (org/name)"
        )
    files = _data_files(root)
    if not files:
        raise UserError(f"{source}: no .jsonl, .json or .parquet files found")
    if (
        split is None or not root.is_dir()
    ):  # a file named on its own is read whatever the split says
        return files
    names = {f: f.name if not root.is_dir() else f.relative_to(root).as_posix() for f in files}
    chosen = [f for f in files if split in names[f]]
    if not chosen:
        raise UserError(
            f"{source}: no file name contains split {split!r}; "
            f"files: {', '.join(sorted(names.values()))[:300]}"
        )
    return chosen


def read_rows(
    source: str,
    format: str,
    split: str | None = None,
    limit: int | None = None,
    subset: int | None = None,
    seed: int = 42,
) -> list[Row]:
    """Rows of `source` in `format`: all, then `subset` drawn at random, then the first `limit`.

    `subset` rows are `random.Random(seed).sample` of all rows (the paper: GSM8K
    200 test items, ARC 500, seed 42); `split` keeps the files whose path contains it.
    """
    rows = [row for _, row in read_located(source, format, split)]
    return select(rows, source, subset=subset, seed=seed, limit=limit)


def read_located(source: str, format: str, split: str | None = None) -> list[tuple[str, Row]]:
    """(where, row) for every record of `source`: `where` names its file and line (or row)."""
    _format_parser(format)  # an unknown format fails before any download
    located: list[tuple[str, Row]] = []
    for path in _source_files(source, split):
        for where, raw in _file_rows(path):
            located.append((where, normalize_row(raw, format, where, len(located))))
    return located


def select(
    rows: list,
    source: str,
    skip: int = 0,
    subset: int | None = None,
    seed: int = 42,
    limit: int | None = None,
) -> list:
    """Leave out the first `skip` rows, draw `subset` of the rest at random, keep the first
    `limit`."""
    for name, value in (("limit", limit), ("subset", subset)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not rows:
        raise UserError(f"{source}: no rows found")
    if skip >= len(rows):
        raise UserError(f"{source}: skip={skip} leaves none of its {len(rows)} rows; lower it")
    rows = rows[skip:]
    if subset is not None:
        if subset > len(rows):
            raise UserError(
                f"{source}: subset={subset} but the source has {len(rows)} rows"
                f"{f' after skipping {skip}' if skip else ''}; lower subset or drop it"
            )
        rows = random.Random(seed).sample(rows, subset)
    return rows[:limit] if limit is not None else rows


# ---------------------------------------------------------------- templates


def _gsm8k_8shot(row: Row) -> str:
    return f"{GSM8K_8SHOT_PREFIX}Question: {row['prompt']}\nAnswer:"


def _arc_zero_shot(row: Row) -> str:
    return ARC_ZERO_SHOT.format(prompt=row["prompt"])


def _prism_prompt(row: Row) -> str:
    if row.get("context") is None:
        return _prism_no_context(row)
    return PRISM_WITH_CONTEXT.format(prompt=row["prompt"], context=row["context"])


def _prism_no_context(row: Row) -> str:
    return PRISM_NO_CONTEXT.format(prompt=row["prompt"])


PAPER_TEMPLATES: dict[str, Callable[[Row], str]] = {
    "gsm8k_8shot": _gsm8k_8shot,
    "arc_zero_shot": _arc_zero_shot,
    "prism": _prism_prompt,  # a row without context gets the context-free version
    "prism_no_context": _prism_no_context,
}


def render_prompt(row: Row, template: str) -> str:
    """The user-turn text of `row` under a named template (see PAPER_TEMPLATES)."""
    if template not in PAPER_TEMPLATES:
        raise UserError(f"unknown template {template!r}; use one of: {', '.join(PAPER_TEMPLATES)}")
    return PAPER_TEMPLATES[template](row)
