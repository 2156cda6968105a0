"""Prompt files, chat templates and personalization contexts.

A prompt file is JSONL with one of three row shapes:
  {"prompt": "..."}                          a single user turn
  {"messages": [{"role": ..., "content": ...}, ...]}   chat turns ending with a user turn
  {"prompt": "...", "context": "..."}        personalization: the user's stated preferences
Other keys (answers, ids) are kept for evaluation and never read by training, except
`incomplete`: when given, the `incomplete` negative strategy uses it as the prompt with
information removed (SVAMP: the Question without its Body) instead of dropping a sentence.

`read_source` also reads the public dataset formats of `formats.py`, from `sources.py`;
`render_prompts` turns prompts into token ids through the model's chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import DataConfig
from ..core.errors import UserError
from ..core.files import read_jsonl
from . import sources, templates
from .tasks import requirements
from .tasks.extract import label_problem

ROLES = {"system", "user", "assistant"}
PROMPT_KEYS = {"prompt", "messages", "context"}
# No tokenizer makes a token of more characters: a prompt longer than this many characters a
# token cannot fit data.max_prompt_tokens, and is skipped (or refused) without tokenising it.
MAX_CHARS_PER_TOKEN = 64


@dataclass
class Prompt:
    """One training prompt, normalised from any row shape."""

    where: str  # its file and line (or row), for messages that point at it
    question: str  # text of the final user turn, before any context is added
    context: str | None = None  # personalization: the user's stated preferences
    history: list[dict[str, str]] = field(default_factory=list)  # earlier turns
    extra: dict[str, Any] = field(default_factory=dict)  # labels etc.; never used to train


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for turn in messages:
        role = turn.get("role") if isinstance(turn, dict) else None
        if (
            not isinstance(role, str)
            or role not in ROLES
            or not isinstance(turn.get("content"), str)
        ):
            raise UserError(
                f"{where}: each turn needs a role (system/user/assistant) and string content"
            )
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: 'messages' must end with a user turn (the prompt to answer)")
    if not messages[-1]["content"].strip():
        raise UserError(f"{where}: the final user turn is empty")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def check_labels(extra: dict[str, Any], where: str) -> None:
    """The keys evaluation reads ('answer', 'task', 'requirements' and 'topic'), checked as
    the row is read: a bad label stops the run before any model loads."""
    if extra.get("answer") is not None:
        problem = label_problem(extra["answer"])
        if problem is not None:
            raise UserError(
                f"{where}: 'answer' must be a number or a choice letter A-E (the label accuracy "
                f"is measured against), got {problem}; fix it, or rename the key"
            )
    if "task" in extra and not (isinstance(extra["task"], str) and extra["task"].strip()):
        raise UserError(f"{where}: 'task' must be a non-empty string naming the row's task")
    if "requirements" in extra:
        problem = requirements.requirements_problem(extra)
        if problem is not None:
            raise UserError(f"{where}: {problem} (rows of the requirements task)")


def parse_row(row: dict, where: str) -> Prompt:
    """Normalise one JSONL row to a `Prompt`; `where` is 'file:line' for errors."""
    extra = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    check_labels(extra, where)
    context = row.get("context")
    if context is not None and (not isinstance(context, str) or not context.strip()):
        raise UserError(f"{where}: 'context' must be a non-empty string")
    if "messages" in row:
        if "prompt" in row:
            raise UserError(f"{where}: give 'prompt' or 'messages', not both")
        turns = _check_messages(row["messages"], where)
        return Prompt(where, turns[-1]["content"], context, turns[:-1], extra)
    if "prompt" not in row:
        raise UserError(
            f"{where}: missing key 'prompt' (or 'messages'); each row needs the prompt text"
        )
    if not isinstance(row["prompt"], str):
        raise UserError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if not row["prompt"].strip():
        raise UserError(f"{where}: 'prompt' is empty; remove the row or give it text")
    return Prompt(where, row["prompt"], context, [], extra)


def read_source(
    source: str,
    format: str = "prompts",
    split: str | None = None,
    skip: int = 0,
    subset: int | None = None,
    seed: int = 42,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts of `source` in `format`: skip the first `skip`, draw `subset` at random, keep
    `limit`."""
    if format == "prompts":
        if split is not None:
            raise UserError(
                f"{source}: a split ({split!r}) only applies to a public data format; "
                "drop it or set the format"
            )
        rows = []
        for n, row in read_jsonl(source, "prompts"):
            rows.append(parse_row(row, f"{source}:{n}"))
            if subset is None and limit is not None and len(rows) >= skip + limit:
                break  # lines after the last one used are not read
        prompts = sources.select(rows, str(source), skip, subset, seed, limit) if rows else []
    else:
        located = sources.select(
            sources.read_located(str(source), format, split), str(source), skip, subset, seed, limit
        )
        prompts = [
            Prompt(
                where,
                row["prompt"],
                row["context"],
                extra={k: v for k, v in row.items() if k not in PROMPT_KEYS and v is not None},
            )
            for where, row in located
        ]
    if len(prompts) < 2:
        raise UserError(
            f"{source}: {len(prompts)} prompt(s); MIPO needs at least 2 "
            "(a negative comes from another prompt)"
        )
    return prompts


def prompt_row(prompt: Prompt) -> dict[str, Any]:
    """A prompt as a row of a prompt file (read back by `parse_row`)."""
    row: dict[str, Any] = (
        {"prompt": prompt.question}
        if not prompt.history
        else {"messages": [*prompt.history, {"role": "user", "content": prompt.question}]}
    )
    if prompt.context is not None:
        row["context"] = prompt.context
    return {**row, **prompt.extra}


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts of a prompt file (all when None)."""
    return read_source(str(path), limit=limit)


def user_text(question: str, context: str | None, config: DataConfig) -> str:
    """The final user turn: the question with the user's context, if any, filled in."""
    if config.template is not None:
        return templates.render_prompt({"prompt": question, "context": context}, config.template)
    if context is None:
        return config.prompt_template.format(prompt=question)
    return config.context_template.format(prompt=question, context=context)


def messages_for(prompt: Prompt, text: str, config: DataConfig) -> list[dict[str, str]]:
    """Chat turns for `prompt` whose final user turn is `text`."""
    turns = list(prompt.history)
    if config.system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": config.system_prompt})
    return turns + [{"role": "user", "content": text}]


def render(tokenizer, messages: list[dict[str, str]], enable_thinking: bool) -> list[int]:
    """Token ids of `messages` through the model's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            "the model's tokenizer has no chat template; use an instruct/chat model "
            "or add 'chat_template' to its tokenizer_config.json"
        )
    # enable_thinking is passed explicitly: mlx-lm turns it on for thinking-capable models.
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    )


@dataclass
class Rendered:
    """Prompts through the chat template: the ones that fit, in file order."""

    prompts: list[Prompt]
    messages: list[list[dict[str, str]]]  # their chat turns
    ids: list[list[int]]  # their token ids, generation prompt included
    skipped: int  # prompts over data.max_prompt_tokens, skipped by data.long_prompts


def block(rendered: Rendered, start: int, end: int) -> Rendered:
    """Prompts start..end-1 of `rendered` (the skipped count stays with the first block)."""
    return Rendered(
        rendered.prompts[start:end],
        rendered.messages[start:end],
        rendered.ids[start:end],
        rendered.skipped if start == 0 else 0,
    )


def render_prompts(prompts: list[Prompt], tokenizer, data: DataConfig, source: str) -> Rendered:
    """Each prompt's chat turns and token ids, the long-prompt policy applied; `source` names
    the prompts in messages. At least 2 must fit (a negative comes from another prompt)."""
    kept = Rendered([], [], [], 0)
    for prompt in prompts:
        messages = messages_for(prompt, user_text(prompt.question, prompt.context, data), data)
        ids = fit_length(tokens(tokenizer, messages, data, prompt.where), data, prompt.where)
        if ids is None:
            kept.skipped += 1
            continue
        kept.prompts.append(prompt)
        kept.messages.append(messages)
        kept.ids.append(ids)
    if len(kept.prompts) < 2:
        raise UserError(
            f"{source}: {len(kept.prompts)} prompt(s) fit data.max_prompt_tokens="
            f"{data.max_prompt_tokens}; raise it or set data.long_prompts=truncate"
        )
    return kept


def tokens(tokenizer, messages: list[dict[str, str]], config: DataConfig, where: str):
    """Token ids of `messages`, or None for text too long to fit however it tokenises (a
    prompt that data.long_prompts truncates is tokenised whole: its end is kept)."""
    chars = sum(len(turn["content"]) for turn in messages)
    if config.long_prompts == "truncate" or chars <= MAX_CHARS_PER_TOKEN * config.max_prompt_tokens:
        return render(tokenizer, messages, config.enable_thinking)
    if config.long_prompts == "error":
        raise UserError(
            f"{where}: prompt has {chars} characters, more than data.max_prompt_tokens="
            f"{config.max_prompt_tokens} tokens hold; raise it or set data.long_prompts to "
            "skip/truncate"
        )
    return None


def fit_length(ids: list[int] | None, config: DataConfig, where: str) -> list[int] | None:
    """Apply the long-prompt policy: None means skip this prompt (None ids: too long already)."""
    if ids is None:
        return None
    if len(ids) <= config.max_prompt_tokens:
        return ids
    if config.long_prompts == "error":
        raise UserError(
            f"{where}: prompt has {len(ids)} tokens, over data.max_prompt_tokens="
            f"{config.max_prompt_tokens}; raise it or set data.long_prompts to skip/truncate"
        )
    if config.long_prompts == "truncate":
        return ids[
            -config.max_prompt_tokens :
        ]  # the end holds the question and the generation prompt
    return None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def drop_one_sentence(text: str, rng) -> str | None:
    """The paper's `incomplete` prompt: drop one random non-final sentence.

    The final sentence (the question) is kept; None when there is nothing to drop.
    """
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return None
    dropped = int(rng.integers(0, len(sentences) - 1))
    return " ".join(s for i, s in enumerate(sentences) if i != dropped)
