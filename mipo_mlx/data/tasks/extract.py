"""Answer extraction for accuracy: numbers after '####' or 'The answer is', choice letters.

Rules (each tested on written-out cases):
  number: the last '#### N' if present, else the last 'the answer is N' (any case);
          commas and a trailing period are ignored; None when neither is found.
  letter: the first letter A-E right after the last 'the answer is' (':' optional).
Both read the response only up to a line starting 'Question:': a model answering a
few-shot prompt (GSM8K 8-shot) may go on to invent the next exemplar and answer it too.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"
_HASHES = re.compile(r"####\s*\$?\s*" + _NUMBER)
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*\$?\s*" + _NUMBER, re.IGNORECASE)
_LETTER = re.compile(r"the answer is\s*:?\s*\(?([A-E])\b", re.IGNORECASE)
_NEXT_EXEMPLAR = re.compile(r"\n\s*Question:")
_LABEL_NUMBER = re.compile(_NUMBER)
LABEL_LETTERS = "ABCDE"


def own_answer(response: str) -> str:
    """The response up to an invented next few-shot exemplar ('\nQuestion: ...')."""
    return _NEXT_EXEMPLAR.split(response, maxsplit=1)[0]


def _number(text: str) -> str:
    value = text.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def extract_number(response: str) -> str | None:
    response = own_answer(response)
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(response)
        if found:
            return _number(found[-1])
    return None


def extract_letter(response: str) -> str | None:
    found = _LETTER.findall(own_answer(response))
    return found[-1].upper() if found else None


def is_correct(response: str, answer: str) -> bool:
    """Exact match of the extracted answer: a letter for choice labels, else a number."""
    if len(answer) == 1 and answer.isalpha():
        return extract_letter(response) == answer.upper()
    got = extract_number(response)
    return got is not None and got == _number(answer)


def label_problem(answer) -> str | None:
    """Why `answer` is no label `is_correct` can match (None when it is one): a label is a
    number as the extraction reads it ('72', '-3', '1,234', '2.5', or a JSON number) or a
    choice letter A-E."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"a {type(answer).__name__}"
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"{answer}"
    text = str(answer)
    if _LABEL_NUMBER.fullmatch(text) or (len(text) == 1 and text.upper() in LABEL_LETTERS):
        return None
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
