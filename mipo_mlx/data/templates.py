"""The paper's prompt templates (data.template): GSM8K's 8-shot chain of thought, ARC's zero-shot
instruction and PRISM's short-answer request, each a function of a row."""

from __future__ import annotations

from collections.abc import Callable

from ..core.errors import UserError
from .formats import Row

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
