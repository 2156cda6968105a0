"""A synthetic instruction corpus of verifiable tasks, with disjoint splits.

Two task families, both checkable without a judge:
  arithmetic word problems, answered "... The answer is N."
  multiple-choice questions, answered "... The answer is: X"
Each problem's split (train / valid / heldout) is a hash of its content, so the
same problem can never appear in two splits, whatever the seed or the count.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ["Tom", "Ann", "Sara", "Ben", "Lily", "Omar", "Mia", "Ravi", "Zoe", "Leo", "Nina", "Sam"]
ITEMS = [
    "apples",
    "pens",
    "books",
    "stamps",
    "shells",
    "cards",
    "coins",
    "marbles",
    "cookies",
    "stickers",
]
LETTERS = "ABCD"
SPLITS = ("train", "valid", "heldout")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the label: a number, or a choice letter
    solution: str  # the worked answer a model should write
    kind: str  # "add", "sub", "add_sub", "largest", "smallest"
    key: tuple  # the content that defines the problem (for the split hash)

    def row(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "task": self.kind}


def split_of(key: tuple) -> str:
    """train 80%, valid 10%, heldout 10%, by a hash of the problem's content."""
    bucket = int(hashlib.sha256(repr(key).encode()).hexdigest(), 16) % 10
    return "heldout" if bucket == 0 else "valid" if bucket == 1 else "train"


def _add(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 39)
    prompt = (
        f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
    )
    return Problem(
        prompt,
        str(a + b),
        f"{a} + {b} = {a + b}. The answer is {a + b}.",
        "add",
        ("add", name, item, a, b),
    )


def _sub(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 1)
    prompt = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} are left?"
    return Problem(
        prompt,
        str(a - b),
        f"{a} - {b} = {a - b}. The answer is {a - b}.",
        "sub",
        ("sub", name, item, a, b),
    )


def _add_sub(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    total = a + b - c
    prompt = (
        f"{name} has {a} {item}. {name} buys {b} more. Then {name} loses {c} {item}. "
        f"How many {item} does {name} have?"
    )
    solution = f"{a} + {b} = {a + b}. {a + b} - {c} = {total}. The answer is {total}."
    return Problem(prompt, str(total), solution, "add_sub", ("add_sub", name, item, a, b, c))


def _choice(rng: random.Random, largest: bool) -> Problem:
    numbers = rng.sample(range(10, 100), 4)
    pick = max(numbers) if largest else min(numbers)
    letter = LETTERS[numbers.index(pick)]
    word = "largest" if largest else "smallest"
    options = " ".join(f"{LETTERS[i]}) {n}" for i, n in enumerate(numbers))
    prompt = f"Which number is the {word}? {options}"
    solution = f"The {word} number is {pick}. The answer is: {letter}"
    return Problem(prompt, letter, solution, word, (word, *numbers))


MAKERS = {
    "add": _add,
    "sub": _sub,
    "add_sub": _add_sub,
    "largest": lambda rng: _choice(rng, True),
    "smallest": lambda rng: _choice(rng, False),
}


def problems(
    split: str, count: int, seed: int, kinds: tuple[str, ...] = tuple(MAKERS)
) -> list[Problem]:
    """`count` distinct problems of `split`, kinds in turn, reproducible from `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = random.Random(f"{split}-{seed}")
    out: list[Problem] = []
    seen: set[tuple] = set()
    while len(out) < count:
        problem = MAKERS[kinds[len(out) % len(kinds)]](rng)
        if problem.key in seen or split_of(problem.key) != split:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out
