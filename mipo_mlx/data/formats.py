"""Public dataset formats read into plain rows.

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

Where rows come from is sources.py; the paper's prompt templates are templates.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..core.errors import UserError

Row = dict[str, Any]
Fields = tuple[str, str | None, str | None]  # prompt, context, answer

ID_KEYS = ("id", "ID", "question_id", "prompt_id", "conversation_id")
LETTERS = "ABCDE"

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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


# ---------------------------------------------------------------- templates
