"""A verifiable personalization task: everyday questions plus requirements the user states.

An item is a short question on one of 16 topics and one or two requirements; the
requirement sentences are the item's context (the {context} of PRISM_WITH_CONTEXT).
Each requirement is checked on the answer text alone:
  capitals  (format)  the answer has a letter and no lowercase letter.
  dashes    (format)  at least 2 non-empty lines, and every non-empty line, with its
                      leading and trailing spaces removed, starts with "- ".
  signoff   (format)  the stripped answer ends with exactly "Hope this helps!" (case and
                      punctuation included), not glued to a letter or digit before it.
  mention   (content) the word appears as a whole word, in any case.
  name      (content) the name appears as a whole word, in any case ("Annabel" is not Ann).
  max_words (length)  at most n words; a word is a whitespace-split token holding a letter
                      or digit, so a lone "-" is no word. n in 8, 10, 12.
  sentences (length)  exactly n sentences, n in 1, 2. A sentence ends at a run of . ! ?
                      followed by a space, a line break or the end; text after the last
                      such run counts as one more. "Dr. Smith came." is two sentences
                      (the templated answers use no abbreviations); "3.5" ends none.
  question  (style)   the stripped answer ends with "?".
  no_commas (style)   no "," anywhere.
Kinds that never share a prompt, so that every item can be satisfied at once:
dashes + sentences (a list is not sentences), signoff + question (both claim the end),
capitals + signoff (the sign-off is exact, in its own case), name + no_commas (the name is
written "Ann, ..."), and sentences=1 with mention, question or signoff (each adds a
sentence of its own, and the answer needs one sentence that names the topic).

well_formed(answer, topic): the answer is still a good answer: it names the topic's
keyword (a whole word, any case), has 3 to 60 words, no letter 4+ times in a row
("SMALLLLL") and no word 3+ times in a row ("the the the").

write_answer honours exactly the requirements it is told to, for any compatible pair. The
plain answer (nothing honoured) is the first 3 or 4 of the topic's sentences: it fails
every checker (tests/test_requirements_tasks.py measures 100% per kind): it has
lowercase letters, one line, no sign-off, none of WORDS or NAMES, more than 12 words,
3+ sentences, a final ".", and a comma in its first three sentences. Where one kind is
honoured and another ignored, the ignored one can hold by chance: max_words writes two
short sentences (meets sentences=2) without commas (meets no_commas); sentences=1 keeps
one sentence of 10-12 words (may meet max_words=10 or 12).

Splits: train 80 / valid 10 / heldout 10 by a hash of (question, requirements), as in
synthetic.py. Every split holds every topic and kind: what is held out is the combination
of question and requirements (the answers are the topic's sentences in every split).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from itertools import combinations

from .synthetic import SPLITS, split_of

KINDS: dict[str, str] = {  # kind -> category, in the order requirements are listed
    **dict.fromkeys(("capitals", "dashes", "signoff"), "format"),
    **dict.fromkeys(("mention", "name"), "content"),
    **dict.fromkeys(("max_words", "sentences"), "length"),
    **dict.fromkeys(("question", "no_commas"), "style"),
}
SIGNOFF = "Hope this helps!"
MENTION = "Think of your {}."  # four words: fits max_words=8 beside a short sentence
QUESTIONS = ("What do you think?", "Does that help?", "Want more ideas?")
WORDS = (
    *("family", "weekend", "budget", "music", "garden", "neighbors", "pets", "teacher"),
    *("holiday", "kitchen", "bicycle", "hobbies", "backpack", "calendar", "notebook", "playlist"),
)
NAMES = (
    *("Ann", "Ben", "Omar", "Mia", "Ravi", "Zoe", "Leo", "Nina"),
    *("Sam", "Lily", "Tom", "Sara", "Kai", "Ella", "Noah", "Maya"),
)
VALUES: dict[str, tuple] = {
    **{kind: (None,) for kind in KINDS},
    "mention": WORDS,
    "name": NAMES,
    "max_words": (8, 10, 12),
    "sentences": (1, 2),
}
TEXTS = {
    "capitals": "Write the whole answer in capital letters.",
    "dashes": "Give the answer as a list, one point per line, each starting with a dash.",
    "signoff": f"End the answer with: {SIGNOFF}",
    "mention": "Mention the word {value}.",
    "name": "Call me by my name, {value}.",
    "max_words": "Use at most {value} words.",
    "sentences": "Answer in exactly {value} sentence{s}.",
    "question": "End with a question to me.",
    "no_commas": "Do not use any commas.",
}
INCOMPATIBLE = frozenset(
    frozenset(pair)
    for pair in (
        ("dashes", "sentences"),
        ("signoff", "question"),
        ("capitals", "signoff"),
        ("name", "no_commas"),
    )
)
ADDS_SENTENCE = frozenset({"mention", "question", "signoff"})
# How often the corpus assistant honours each kind. Spread over 0.15-0.6 so that MIPO's
# gain can be read against the base rate; none near 0, since MIPO only amplifies what the
# base sometimes does. Harder-looking transformations (capitals, no_commas) are rarer.
RATES: dict[str, float] = {
    "capitals": 0.2,
    "dashes": 0.4,
    "signoff": 0.5,
    "mention": 0.35,
    "name": 0.6,
    "max_words": 0.25,
    "sentences": 0.3,
    "question": 0.45,
    "no_commas": 0.15,
}

# One block per topic: "name | keyword", the two question forms, four answer sentences
# (the first names the keyword; any first 3 read as an answer; each has 5-12 words), then
# two short sentences of at most 4 words (the first names the keyword) for max_words.
_TOPIC_TABLE = """
breakfast | breakfast
What is a good breakfast? | What should I eat for breakfast?
Oatmeal with fruit is a good breakfast, and it is quick.
It is warm and filling on a cold day.
Eggs on toast are a good choice too.
Both will keep you full until lunch.
Try oatmeal for breakfast. | Eggs are good too.

sleep | sleep
How can I sleep better? | What helps me sleep well?
To sleep well, go to bed at the same time.
Keep your room dark, cool and quiet.
Avoid coffee in the late afternoon.
A short walk in the day also helps.
Sleep at set times. | Keep the room dark.

water | water
How much water should I drink? | How much water do I need each day?
Most people need about eight cups of water, or more when hot.
Drink a glass with each meal.
Keep a bottle with you during the day.
Thirst is a sign to drink more.
Drink water often. | Eight cups is enough.

exercise | exercise
How can I start to exercise? | What is an easy way to exercise?
A daily walk is easy exercise, and it costs nothing.
Start with ten minutes and add more each week.
Stretch for a few minutes after you walk.
Rest for a day when something hurts.
Walk daily for exercise. | Start with ten minutes.

study | study
How can I study better? | What is a good way to study?
Study in short blocks of time, with a break after each one.
Put your phone in another room.
Test yourself instead of reading the notes again.
Sleep well before a big exam.
Study in short blocks. | Then test yourself.

plant | plant
How do I keep a plant alive? | How should I care for a house plant?
Water the plant only when the soil feels dry, not daily.
Most house plants like bright light but not direct sun.
Use a pot with holes in the bottom.
Too much water is the most common mistake.
Water the plant lightly. | Give it light.

tea | tea
How do I make a good cup of tea? | What is the best way to make tea?
Pour hot water on the tea, and wait three minutes.
Green tea likes water that is not quite boiling.
Take the bag out so it does not turn bitter.
Add milk or honey if you like.
Steep the tea briefly. | Add honey if wanted.

packing | pack
How should I pack for a short trip? | What should I pack for a few days away?
Pack light, with clothes you can wear more than once.
Roll your clothes to save space in the bag.
Keep your charger and papers in one small pouch.
Check the weather before you leave.
Pack light clothes. | Roll them tight.

money | money
How can I save money? | What is an easy way to save money?
Put a little money aside each month, before you spend the rest.
Cook at home more often than you eat out.
Cancel the services you do not use.
Wait a day before you buy something big.
Save money each month. | Cook at home.

cold | cold
What helps with a cold? | How can I feel better with a cold?
Rest and drink warm fluids, and a cold usually passes.
Honey in warm tea can soothe a sore throat.
Wash your hands often so others stay well.
See a doctor if a fever lasts days.
Rest with a cold. | Drink warm fluids.

reading | read
How can I read more books? | How do I build a reading habit?
Read for ten minutes before bed, and keep a book nearby.
Pick books you enjoy, not ones you feel you should read.
Carry a book for short waits in line.
It is fine to stop a book you dislike.
Read ten minutes daily. | Pick fun books.

focus | focus
How can I focus at work? | How do I stay focused?
To focus, work on one task for half an hour.
Close the tabs and apps you do not need.
Take a short break to stretch and drink water.
Write down stray thoughts to deal with later.
Focus on one task. | Then take breaks.

rice | rice
How do I cook rice? | What is the best way to cook rice?
Rinse the rice, then use two cups of water per cup.
Bring it to a boil and cover the pot.
Cook it on low heat for about fifteen minutes.
Let it rest before you fluff it with a fork.
Rinse the rice first. | Simmer it covered.

shoes | shoes
How do I pick running shoes? | What should I look for in running shoes?
Running shoes should fit snugly, with room at the toes.
Try them on late in the day.
Take a short jog in the store if you can.
Replace them after about five hundred miles.
Buy snug running shoes. | Try them late.

cleaning | clean
How can I keep my room clean? | How do I keep a tidy room?
Spend ten minutes each evening to clean, and put things back.
Give every item a fixed place to live.
Make the bed as soon as you get up.
Keep a basket for laundry by the door.
Clean ten minutes daily. | Make the bed.

stress | stress
How can I deal with stress? | What helps with stress?
Slow breathing can ease stress, so take five deep breaths.
A walk outside helps clear the mind.
Talk to someone you trust about what worries you.
Keep a regular time for sleep and meals.
Slow breaths ease stress. | Take a walk.
"""


@dataclass(frozen=True)
class Topic:
    name: str
    keyword: str
    questions: tuple[str, ...]
    sentences: tuple[str, ...]
    short: tuple[str, ...]


def _parse_topics(table: str) -> dict[str, Topic]:
    topics = {}
    for block in table.strip().split("\n\n"):
        head, asks, *sentences, short = [line.split(" | ") for line in block.splitlines()]
        topic = Topic(head[0], head[1], tuple(asks), tuple(s for [s] in sentences), tuple(short))
        topics[topic.name] = topic
    return topics


TOPICS = _parse_topics(_TOPIC_TABLE)

# ---------------------------------------------------------------- checkers

_TERMINAL = re.compile(r"[.!?]+(?=\s|$)")
_LETTER_RUN = re.compile(r"([a-z])\1{3,}", re.IGNORECASE)


def words(text: str) -> list[str]:
    """Whitespace-split tokens holding a letter or digit (a lone dash is no word)."""
    return [token for token in text.split() if any(c.isalnum() for c in token)]


def sentence_count(text: str) -> int:
    text = text.strip()
    ends = list(_TERMINAL.finditer(text))
    tail = text[ends[-1].end() :] if ends else text
    return len(ends) + any(c.isalnum() for c in tail)


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _dashes(answer: str) -> bool:
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    return len(lines) >= 2 and all(line.startswith("- ") for line in lines)


def _signoff(answer: str) -> bool:
    answer = answer.strip()
    before = answer[: -len(SIGNOFF)][-1:]
    return answer.endswith(SIGNOFF) and not before.isalnum()


CHECKS = {
    "capitals": lambda a, _: any(c.isalpha() for c in a) and not any(c.islower() for c in a),
    "dashes": lambda a, _: _dashes(a),
    "signoff": lambda a, _: _signoff(a),
    "mention": lambda a, word: _has_word(word, a),
    "name": lambda a, name: _has_word(name, a),
    "max_words": lambda a, n: len(words(a)) <= n,
    "sentences": lambda a, n: sentence_count(a) == n,
    "question": lambda a, _: a.strip().endswith("?"),
    "no_commas": lambda a, _: "," not in a,
}


def well_formed(answer: str, topic: str) -> bool:
    tokens = [re.sub(r"\W", "", token.lower()) for token in words(answer)]
    tripled = any(tokens[i] == tokens[i + 1] == tokens[i + 2] for i in range(len(tokens) - 2))
    return (
        _has_word(TOPICS[topic].keyword, answer)
        and 3 <= len(tokens) <= 60
        and _LETTER_RUN.search(answer) is None
        and not tripled
    )


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class Requirement:
    kind: str
    value: str | int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown requirement kind {self.kind!r}; known: {list(KINDS)}")
        expected = type(VALUES[self.kind][0])
        if type(self.value) is not expected:
            raise ValueError(f"{self.kind} takes a {expected.__name__} value, got {self.value!r}")

    @property
    def text(self) -> str:
        return TEXTS[self.kind].format(value=self.value, s="" if self.value == 1 else "s")

    def complies(self, answer: str) -> bool:
        return CHECKS[self.kind](answer, self.value)


def _key(question: str, requirements: tuple[Requirement, ...]) -> tuple:
    return (question, *((r.kind, r.value) for r in requirements))


@dataclass(frozen=True)
class Item:
    question: str
    topic: str
    requirements: tuple[Requirement, ...]  # in KINDS order

    @property
    def context(self) -> str:
        return " ".join(r.text for r in self.requirements)

    @property
    def key(self) -> tuple:
        return _key(self.question, self.requirements)

    def row(self) -> dict:
        """A prompt-file row: prompt and context, plus what evaluation needs to check."""
        return {
            "prompt": self.question,
            "context": self.context,
            "task": "requirements",
            "topic": self.topic,  # well_formed checks an answer against it
            "requirements": [{"kind": r.kind, "value": r.value} for r in self.requirements],
        }


def requirements_from_row(row: dict) -> tuple[Requirement, ...]:
    """The requirements of a prompt-file row written by `Item.row` (read back from JSONL)."""
    return tuple(Requirement(r["kind"], r["value"]) for r in row["requirements"])


def requirements_problem(row: dict) -> str | None:
    """Why a row's 'requirements' and 'topic' are not what `requirements_from_row` and
    `well_formed` read (None when they are): a non-empty list of {kind, value} and a known
    topic."""
    listed = row["requirements"]
    if not isinstance(listed, list) or not listed:
        return "'requirements' must be a non-empty list of {kind, value}"
    for r in listed:
        if not isinstance(r, dict) or set(r) != {"kind", "value"} or not isinstance(r["kind"], str):
            return "each of 'requirements' must be {kind, value}"
        try:
            Requirement(r["kind"], r["value"])
        except ValueError as err:
            return f"'requirements': {err}"
    if not isinstance(row.get("topic"), str) or row["topic"] not in TOPICS:
        return f"'topic' must name one of the topics ({', '.join(TOPICS)})"
    return None


def compliance(item_or_requirements, answer: str) -> list[bool]:
    """One verdict per requirement, in order, for an Item or a sequence of Requirements."""
    requirements = getattr(item_or_requirements, "requirements", item_or_requirements)
    return [r.complies(answer) for r in requirements]


def compatible(a: Requirement, b: Requirement) -> bool:
    """Whether one answer can meet both (see the module docstring)."""
    if a.kind == b.kind or frozenset((a.kind, b.kind)) in INCOMPATIBLE:
        return False
    values = {a.kind: a.value, b.kind: b.value}
    return not (values.get("sentences") == 1 and ADDS_SENTENCE & values.keys())


def _choices(kind: str) -> list[Requirement]:
    return [Requirement(kind, value) for value in VALUES[kind]]


@cache
def item_space(split: str) -> tuple[tuple[tuple[str, ...], tuple[Item, ...]], ...]:
    """Every item of `split`, grouped by its requirement kinds: ((kinds, items), ...)."""
    singles = [(r,) for kind in KINDS for r in _choices(kind)]
    pairs = [
        (a, b)
        for first, second in combinations(KINDS, 2)
        for a in _choices(first)
        for b in _choices(second)
        if compatible(a, b)
    ]
    groups: dict[tuple[str, ...], list[Item]] = {}
    for reqs in singles + pairs:
        group = groups.setdefault(tuple(r.kind for r in reqs), [])
        group.extend(
            Item(question, topic.name, reqs)
            for topic in TOPICS.values()
            for question in topic.questions
            if split_of(_key(question, reqs)) == split
        )
    return tuple((kinds, tuple(group)) for kinds, group in groups.items() if group)


def items(split: str, n: int, seed: int) -> list[Item]:
    """`n` distinct items of `split`, reproducible from `seed`: each draw picks one or two
    requirements (even odds), then a kind group among those not used up, then an item of it;
    so every kind is about as common, though `mention` and `name` hold most of the items."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = random.Random(f"requirements-{split}-{seed}")
    groups = {kinds: rng.sample(group, len(group)) for kinds, group in item_space(split)}
    total = sum(map(len, groups.values()))
    if n > total:
        raise ValueError(f"the {split} split holds {total} distinct requirement items, not {n}")
    out: list[Item] = []
    while len(out) < n:
        size = rng.choice((1, 2))
        left = [kinds for kinds, group in groups.items() if group]
        out.append(groups[rng.choice([k for k in left if len(k) == size] or left)].pop())
    return out


# ---------------------------------------------------------------- answers


def draw_honour(item: Item, rng: random.Random, rates: dict[str, float] = RATES) -> set[str]:
    """The kinds the corpus assistant honours on this item, each with its rate."""
    return {r.kind for r in item.requirements if rng.random() < rates[r.kind]}


def write_answer(item: Item, honour: dict[str, bool] | set[str], rng: random.Random) -> str:
    """The templated answer, honouring exactly the item's requirements whose kind is in
    `honour`. The random draws are the same whatever is honoured, so one rng state gives
    answers that differ only by the transformations."""
    if isinstance(honour, dict):
        honour = {kind for kind, on in honour.items() if on}
    values = {r.kind: r.value for r in item.requirements if r.kind in honour}
    topic = TOPICS[item.topic]
    length, ending = rng.choice((3, 4)), rng.choice(QUESTIONS)
    body = list(topic.short if "max_words" in values else topic.sentences[:length])
    extras = [MENTION.format(values["mention"])] if "mention" in values else []
    extras += [ending] if "question" in values else [SIGNOFF] if "signoff" in values else []
    if "sentences" in values:
        body = body[: max(1, values["sentences"] - len(extras))]
    if "name" in values:
        body[0] = f"{values['name']}, {body[0][0].lower()}{body[0][1:]}"
    if "max_words" in values:  # the first short sentence (with the keyword) always stays
        while len(body) > 1 and len(words(" ".join(body + extras))) > values["max_words"]:
            body.pop()
    lines = body + extras
    text = "\n".join(f"- {line}" for line in lines) if "dashes" in values else " ".join(lines)
    if "no_commas" in values:
        text = text.replace(",", "")
    # Last, so that every other transformation's words come out in capitals too.
    return text.upper() if "capitals" in values else text
