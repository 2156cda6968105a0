"""Prompt files, templates, chat rendering, length policy, sentence dropping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mipo_mlx.core.config import DataConfig
from mipo_mlx.core.errors import UserError
from mipo_mlx.data.prompts import (
    Prompt,
    drop_one_sentence,
    fit_length,
    messages_for,
    parse_row,
    read_prompts,
    render,
    split_sentences,
    user_text,
)
from mipo_mlx.engine.toy import build_model_folder


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def rows(*objs) -> list[str]:
    return [json.dumps(o) for o in objs]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    folder = build_model_folder(tmp_path_factory.mktemp("toy") / "model")
    return load_tokenizer(folder)


# ---------------------------------------------------------------- parse_row


def test_parse_row_plain_prompt():
    assert parse_row({"prompt": "What is 2+2?"}, "p.jsonl:3") == Prompt(
        "p.jsonl:3", "What is 2+2?", None, [], {}
    )


def test_parse_row_messages():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "name": "bot"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "id": 7,
    }
    prompt = parse_row(row, "p.jsonl:12")
    assert prompt == Prompt(
        "p.jsonl:12",
        "What is 2+2?",
        None,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],  # extra turn keys are dropped
        {"id": 7},
    )


def test_parse_row_single_message():
    prompt = parse_row({"messages": [{"role": "user", "content": "Q?"}]}, "f:1")
    assert (prompt.question, prompt.history, prompt.context) == ("Q?", [], None)


def test_parse_row_prompt_with_context():
    prompt = parse_row(
        {"prompt": "Plan a trip.", "context": "I hate flying.", "answer": "B"}, "f:2"
    )
    assert prompt == Prompt("f:2", "Plan a trip.", "I hate flying.", [], {"answer": "B"})


def test_parse_row_null_context_means_none():
    assert parse_row({"prompt": "Q", "context": None}, "f:1").context is None


def test_parse_row_messages_with_context():
    prompt = parse_row({"messages": [{"role": "user", "content": "Q"}], "context": "short"}, "f:4")
    assert (prompt.question, prompt.context) == ("Q", "short")


def test_parse_row_keeps_extra_keys():
    prompt = parse_row({"prompt": "Q", "answer": "A", "meta": {"k": [1, 2]}, "id": "x1"}, "f:1")
    assert prompt.extra == {"answer": "A", "meta": {"k": [1, 2]}, "id": "x1"}


def test_parse_row_keeps_where_it_came_from():
    assert parse_row({"prompt": "Q"}, "inline").where == "inline"
    assert parse_row({"prompt": "Q"}, "f.jsonl:7").where == "f.jsonl:7"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "Q"}, "missing key 'prompt' (or 'messages'); each row needs the prompt text"),
        ({"prompt": ""}, "'prompt' is empty; remove the row or give it text"),
        ({"prompt": "   \n"}, "'prompt' is empty; remove the row or give it text"),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            "'messages' must end with a user turn (the prompt to answer)",
        ),
        (
            {"messages": [{"role": "bot", "content": "Q"}]},
            "each turn needs a role (system/user/assistant) and string content",
        ),
        (
            {"messages": [{"content": "Q"}]},
            "each turn needs a role (system/user/assistant) and string content",
        ),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "each turn needs a role (system/user/assistant) and string content",
        ),
        ({"messages": ["Q"]}, "each turn needs a role (system/user/assistant) and string content"),
        ({"messages": []}, "'messages' must be a non-empty list of {role, content} turns"),
        ({"messages": "Q"}, "'messages' must be a non-empty list of {role, content} turns"),
        ({"messages": [{"role": "user", "content": "  "}]}, "the final user turn is empty"),
        (
            {"prompt": "Q", "messages": [{"role": "user", "content": "Q"}]},
            "give 'prompt' or 'messages', not both",
        ),
        ({"prompt": "Q", "context": 5}, "'context' must be a non-empty string"),
        ({"prompt": "Q", "context": ["a"]}, "'context' must be a non-empty string"),
        ({"prompt": "Q", "context": " "}, "'context' must be a non-empty string"),
    ],
)
def test_parse_row_errors_name_file_and_line(row, message):
    with pytest.raises(UserError) as err:
        parse_row(row, "data/p.jsonl:7")
    assert str(err.value) == f"data/p.jsonl:7: {message}"


@pytest.mark.parametrize("role", [["user"], {"r": "user"}])
def test_parse_row_unhashable_role_is_a_user_error(role):
    # BUG: _check_messages tests `turn.get("role") not in ROLES` (a set); a list or
    # dict role raises TypeError: unhashable type, instead of a file:line UserError.
    with pytest.raises(UserError) as err:
        parse_row({"messages": [{"role": role, "content": "Q"}]}, "p.jsonl:2")
    assert str(err.value).startswith("p.jsonl:2: ")


# ---------------------------------------------------------------- read_prompts


def test_read_prompts_all_shapes(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        rows(
            {"prompt": "One."},
            {"messages": [{"role": "user", "content": "Two?"}]},
            {"prompt": "Three.", "context": "ctx"},
        ),
    )
    prompts = read_prompts(path)
    assert [(p.where, p.question, p.context) for p in prompts] == [
        (f"{path}:1", "One.", None),
        (f"{path}:2", "Two?", None),
        (f"{path}:3", "Three.", "ctx"),
    ]


def test_read_prompts_error_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl", rows({"prompt": "ok"}, {"prompt": "ok"}, {"prompt": ""})
    )
    with pytest.raises(UserError) as err:
        read_prompts(path)
    assert str(err.value) == f"{path}:3: 'prompt' is empty; remove the row or give it text"


@pytest.mark.parametrize("count", [0, 1])
def test_read_prompts_needs_two(tmp_path, count):
    path = write_lines(tmp_path / "p.jsonl", rows(*[{"prompt": "Q"}] * count))
    with pytest.raises(UserError) as err:
        read_prompts(path)
    assert str(err.value) == (
        f"{path}: {count} prompt(s); MIPO needs at least 2 (a negative comes from another prompt)"
    )


def test_read_prompts_malformed_json_reports_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}), "", '{"prompt": "b",}'])
    with pytest.raises(UserError) as err:
        read_prompts(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: not valid JSON (")
    assert message.endswith("); fix or remove the line")


def test_read_prompts_non_object_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}), '["b"]'])
    with pytest.raises(UserError) as err:
        read_prompts(path)
    assert str(err.value) == f"{path}:2: each line must be a JSON object"


def test_read_prompts_non_utf8_reports_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError) as err:
        read_prompts(path)
    assert str(err.value) == f"{path}:3: not UTF-8 text; re-save the file as UTF-8"


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(UserError) as err:
        read_prompts(tmp_path / "none.jsonl")
    assert str(err.value) == f"{tmp_path / 'none.jsonl'}: prompts file not found"


def test_read_prompts_skips_blank_lines_and_keeps_numbers(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        ["", json.dumps({"prompt": "a"}), "   ", "\t", json.dumps({"prompt": "b"}), ""],
    )
    prompts = read_prompts(path)
    assert [(p.where, p.question) for p in prompts] == [(f"{path}:2", "a"), (f"{path}:5", "b")]


def test_read_prompts_limit(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl", rows(*[{"prompt": f"q{i}"} for i in range(5)]) + ["not json"]
    )
    prompts = read_prompts(path, limit=3)  # stops before the bad line
    assert [p.question for p in prompts] == ["q0", "q1", "q2"]


def test_read_prompts_limit_below_two(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", rows(*[{"prompt": f"q{i}"} for i in range(5)]))
    with pytest.raises(UserError, match=r": 1 prompt\(s\); MIPO needs at least 2"):
        read_prompts(path, limit=1)


def test_read_prompts_keeps_extra(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl", rows({"prompt": "a", "answer": 7}, {"prompt": "b", "id": "x"})
    )
    assert [p.extra for p in read_prompts(path)] == [{"answer": 7}, {"id": "x"}]


# ---------------------------------------------------------------- templates and messages


def test_user_text_default_templates():
    data = DataConfig()
    assert user_text("Plan a trip.", None, data) == "Plan a trip."
    assert user_text("Plan a trip.", "No flights.", data) == (
        "Plan a trip.\n\nPlease respect the following requirements made by the user: No flights."
    )


def test_user_text_custom_templates():
    data = DataConfig(prompt_template="Q: {prompt}\nA:", context_template="[{context}] {prompt}")
    assert user_text("2+2?", None, data) == "Q: 2+2?\nA:"
    assert user_text("2+2?", "be terse", data) == "[be terse] 2+2?"


def test_user_text_leaves_braces_in_the_prompt_alone():
    assert user_text("Use {x} and {prompt}", None, DataConfig()) == "Use {x} and {prompt}"


def test_messages_for_plain():
    prompt = Prompt("f:1", "Q")
    assert messages_for(prompt, "Q!", DataConfig()) == [{"role": "user", "content": "Q!"}]


def test_messages_for_with_system_prompt_and_history():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = Prompt("f:1", "Q", None, history)
    assert messages_for(prompt, "text", DataConfig(system_prompt="Be brief.")) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "text"},
    ]
    assert prompt.history == history  # not modified


def test_messages_for_keeps_the_rows_own_system_turn():
    history = [{"role": "system", "content": "Row system."}]
    prompt = Prompt("f:1", "Q", None, history)
    assert messages_for(prompt, "Q", DataConfig(system_prompt="Config system.")) == [
        {"role": "system", "content": "Row system."},
        {"role": "user", "content": "Q"},
    ]


# ---------------------------------------------------------------- render


def test_render_through_the_chat_template(tokenizer):
    ids = render(tokenizer, [{"role": "user", "content": "How many apples?"}], False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert (
        tokenizer.decode(ids)
        == "<|im_start|>user\nHow many apples?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_full_pipeline_of_turns(tokenizer):
    data = DataConfig(system_prompt="Be brief.")
    prompt = parse_row({"prompt": "Plan a trip.", "context": "No flights."}, "f:1")
    messages = messages_for(prompt, user_text(prompt.question, prompt.context, data), data)
    text = tokenizer.decode(render(tokenizer, messages, False))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPlan a trip.\n\n"
        "Please respect the following requirements made by the user: "
        "No flights.<|im_end|>\n<|im_start|>assistant\n"
    )


class FakeTokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return (5, 6, 7)


def test_render_without_chat_template():
    with pytest.raises(UserError) as err:
        render(FakeTokenizer(None), [{"role": "user", "content": "Q"}], False)
    assert str(err.value) == (
        "the model's tokenizer has no chat template; use an instruct/chat model "
        "or add 'chat_template' to its tokenizer_config.json"
    )


@pytest.mark.parametrize("thinking", [True, False])
def test_render_passes_generation_prompt_and_thinking(thinking):
    tok = FakeTokenizer("{{ messages }}")
    messages = [{"role": "user", "content": "Q"}]
    assert render(tok, messages, thinking) == [5, 6, 7]
    assert tok.calls == [(messages, {"add_generation_prompt": True, "enable_thinking": thinking})]


# ---------------------------------------------------------------- fit_length


def test_fit_length_short_prompt_is_kept():
    ids = list(range(8))
    for policy in ("skip", "truncate", "error"):
        assert fit_length(ids, DataConfig(max_prompt_tokens=8, long_prompts=policy), "f:1") == ids


def test_fit_length_skip():
    assert (
        fit_length(list(range(9)), DataConfig(max_prompt_tokens=8, long_prompts="skip"), "f:1")
        is None
    )


def test_fit_length_truncate_keeps_the_end():
    ids = list(range(20))
    assert fit_length(ids, DataConfig(max_prompt_tokens=8, long_prompts="truncate"), "f:1") == list(
        range(12, 20)
    )


def test_fit_length_error():
    with pytest.raises(UserError) as err:
        fit_length(
            list(range(9)), DataConfig(max_prompt_tokens=8, long_prompts="error"), "p.jsonl:4"
        )
    assert str(err.value) == (
        "p.jsonl:4: prompt has 9 tokens, over data.max_prompt_tokens=8; "
        "raise it or set data.long_prompts to skip/truncate"
    )


# ---------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("  A b c.  \n D e?  ", ["A b c.", "D e?"]),
        ("Pi is 3.14 here. Why?", ["Pi is 3.14 here.", "Why?"]),
        ("Just one", ["Just one"]),
        ("", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_drop_one_sentence_none_for_one_sentence():
    rng = np.random.default_rng(0)
    assert drop_one_sentence("What is 2+2?", rng) is None
    assert drop_one_sentence("", rng) is None


def test_drop_one_sentence_two_sentences_drops_the_first():
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert drop_one_sentence("Tom has 3 apples. How many?", rng) == "How many?"


def test_drop_one_sentence_over_many_seeds():
    text = "S0 a. S1 b! S2 c. S3 d? Final question?"
    sentences = split_sentences(text)
    dropped = []
    for seed in range(200):
        out = drop_one_sentence(text, np.random.default_rng(seed))
        kept = out.split(" ")
        assert out.endswith("Final question?")
        missing = [s for s in sentences if s not in out]
        assert len(missing) == 1, out
        assert len(kept) == len(text.split(" ")) - 2
        dropped.append(sentences.index(missing[0]))
    assert set(dropped) == {0, 1, 2, 3}  # every non-final sentence, never the final one


def test_drop_one_sentence_is_seeded():
    text = "A. B. C. D. E?"
    first = [drop_one_sentence(text, np.random.default_rng(s)) for s in range(10)]
    second = [drop_one_sentence(text, np.random.default_rng(s)) for s in range(10)]
    assert first == second
