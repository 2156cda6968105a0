"""Bad input: one line naming the input and what to do, exit 2, no traceback, the output folder
untouched.

Each case runs the command's `main(argv)` in this process (tests/in_process.py), as fast as
a unit test; a few run `python -m mipo_mlx.<command>` in a process of their own, to prove the
same of the real command end to end."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from .builders import remote_code_model
from .in_process import run_main

GOOD = [
    {"prompt": "Tom has 3 apples. How many?"},
    {"prompt": "Ann has 5 pens. How many?"},
    {"prompt": "Sam has 2 books. How many?"},
]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


FAST = ["--generation.max_tokens", "4", "--generation.truncated", "keep"]
FIFO = "<a FIFO, made with os.mkfifo>"  # a file of CASES that is a named pipe

# name: (files to write {name: text or bytes}, extra CLI args, fragment the message must contain)
CASES = {
    "malformed json line": (
        {"p.jsonl": jsonl(GOOD) + '{"prompt": "x"\n'},
        [],
        "p.jsonl:4: not valid JSON",
    ),
    "missing prompt key": (
        {"p.jsonl": jsonl(GOOD + [{"text": "hi"}])},
        [],
        "p.jsonl:4: missing key 'prompt'",
    ),
    "empty prompt": (
        {"p.jsonl": jsonl(GOOD + [{"prompt": "  "}])},
        [],
        "p.jsonl:4: 'prompt' is empty",
    ),
    "messages end with assistant": (
        {
            "p.jsonl": jsonl(
                GOOD
                + [
                    {
                        "messages": [
                            {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "yo"},
                        ]
                    }
                ]
            )
        },
        [],
        "p.jsonl:4: 'messages' must end with a user turn",
    ),
    "bad role": (
        {"p.jsonl": jsonl(GOOD + [{"messages": [{"role": "bot", "content": "hi"}]}])},
        [],
        "p.jsonl:4: each turn needs a role",
    ),
    "context not a string": (
        {"p.jsonl": jsonl(GOOD + [{"prompt": "hi", "context": 3}])},
        [],
        "p.jsonl:4: 'context' must be a non-empty string",
    ),
    "non-utf8 bytes": (
        {"p.jsonl": jsonl(GOOD).encode() + b'{"prompt": "caf\xe9"}\n'},
        [],
        "p.jsonl:4: not UTF-8",
    ),
    "prompt over the limit": (
        {"p.jsonl": jsonl(GOOD + [{"prompt": "word " * 400}])},
        ["--data.long_prompts", "error", "--data.max_prompt_tokens", "64"],
        "p.jsonl:4: prompt has",
    ),
    "fewer than 2 prompts": ({"p.jsonl": jsonl(GOOD[:1])}, [], "MIPO needs at least 2"),
    "impossible derangement": ({"p.jsonl": jsonl([GOOD[0]] * 3)}, [], "no derangement exists"),
    "no context for no_context": (
        {"p.jsonl": jsonl(GOOD)},
        ["--pairs.negatives", "no_context"],
        "needs a 'context' on every prompt row",
    ),
    "prompts file missing": ({}, [], "prompts file not found"),
    "missing model path": (
        {"p.jsonl": jsonl(GOOD)},
        ["--model", "./no/such/model"],
        "model folder not found",
    ),
    "model without tokenizer": (
        {"p.jsonl": jsonl(GOOD)},
        ["--model", "{model_no_tok}"],
        "no tokenizer files",
    ),
    "model without chat template": (
        {"p.jsonl": jsonl(GOOD)},
        ["--model", "{model_no_template}"],
        "has no chat template",
    ),
    "corrupt safetensors": (
        {"p.jsonl": jsonl(GOOD)},
        ["--model", "{model_corrupt}"],
        "could not load the model",
    ),
    "unknown config key": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "training:\n  learning_rat: 1e-5\n"},
        ["--config", "{dir}/c.yaml"],
        "did you mean 'training.learning_rate'",
    ),
    "wrong type in config": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "training:\n  batch_size: four\n"},
        ["--config", "{dir}/c.yaml"],
        "'training.batch_size' must be an integer",
    ),
    "bad yaml": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "training: [\n"},
        ["--config", "{dir}/c.yaml"],
        "not valid YAML",
    ),
    "config file missing": (
        {"p.jsonl": jsonl(GOOD)},
        ["--config", "{dir}/none.yaml"],
        "config file not found",
    ),
    "unknown cli option": (
        {"p.jsonl": jsonl(GOOD)},
        ["--training.bata", "0.2"],
        "unknown option '--training.bata'",
    ),
    "negative learning rate": (
        {"p.jsonl": jsonl(GOOD)},
        ["--training.learning_rate", "-1e-5"],
        "'training.learning_rate' must be greater than 0",
    ),
    "nan value": ({"p.jsonl": jsonl(GOOD)}, ["--training.beta", ".nan"], "must be a finite number"),
    "bad choice": (
        {"p.jsonl": jsonl(GOOD)},
        ["--pairs.negatives", "shuffled"],
        "'pairs.negatives' must be one of",
    ),
    "bad template": (
        {"p.jsonl": jsonl(GOOD)},
        ["--data.prompt_template", "Q: {question}"],
        "'data.prompt_template' has the field '{question}'; use only {prompt}",
    ),
    "output is another run": (
        {"p.jsonl": jsonl(GOOD)},
        ["--output", "{earlier_run}"],
        "holds an earlier run",
    ),
    "output is a file": (
        {"p.jsonl": jsonl(GOOD), "file.txt": "x"},
        ["--output", "{dir}/file.txt"],
        "exists and is not a folder",
    ),
    "resume without a run": (
        {"p.jsonl": jsonl(GOOD)},
        ["--resume", "{dir}/nothing"],
        "no run to resume",
    ),
    "eval prompts missing": (
        {"p.jsonl": jsonl(GOOD)},
        ["--evaluation.prompts", "{dir}/held.jsonl"],
        "held.jsonl: prompts file not found",
    ),
    "prompt not a string": (
        {"p.jsonl": jsonl(GOOD + [{"prompt": 42}])},
        [],
        "p.jsonl:4: 'prompt' must be",
    ),
    "messages not a list": (
        {"p.jsonl": jsonl(GOOD + [{"messages": "hi"}])},
        [],
        "p.jsonl:4: 'messages' must be a non-empty list of {role, content} turns",
    ),
    "line not an object": (
        {"p.jsonl": jsonl(GOOD) + "[1, 2]\n"},
        [],
        "p.jsonl:4: each line must be a JSON object",
    ),
    "empty prompts file": ({"p.jsonl": ""}, [], "p.jsonl: 0 prompt(s)"),
    "prompts path is a folder": (
        {"p.jsonl": jsonl(GOOD)},
        ["--prompts", "{dir}"],
        "is a folder, not a prompts file",
    ),
    "model path is a file": (
        {"p.jsonl": jsonl(GOOD), "m.bin": "x"},
        ["--model", "{dir}/m.bin"],
        "m.bin: no config.json; point model.path at an mlx-lm/Hugging Face model folder",
    ),
    "yaml not a mapping": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "- 1\n- 2\n"},
        ["--config", "{dir}/c.yaml"],
        "c.yaml: expected a mapping of sections",
    ),
    "yaml section not a mapping": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "training: 3\n"},
        ["--config", "{dir}/c.yaml"],
        "section 'training' must be a mapping of keys",
    ),
    "lora rank zero": ({"p.jsonl": jsonl(GOOD)}, ["--lora.rank", "0"], "'lora.rank'"),
    "top_p zero": ({"p.jsonl": jsonl(GOOD)}, ["--generation.top_p", "0"], "'generation.top_p'"),
    "negative iters": (
        {"p.jsonl": jsonl(GOOD)},
        ["--iters", "-1"],
        "'training.iters' must be at least 1, got -1",
    ),
    "evaluation limit below 2": (
        {"p.jsonl": jsonl(GOOD)},
        ["--evaluation.prompts", "{dir}/p.jsonl", "--evaluation.limit", "1"],
        "'evaluation.limit'",
    ),
    "lora key matches no layer": (
        {"p.jsonl": jsonl(GOOD)},
        ["--lora.keys", "[self_attn.q_prj]"],
        "lora.keys: 'self_attn.q_prj' is no linear layer of this model",
    ),
    "judge model missing": (
        {"p.jsonl": jsonl(GOOD), "h.jsonl": jsonl([{**r, "context": "Be brief."} for r in GOOD])},
        ["--evaluation.prompts", "{dir}/h.jsonl", "--evaluation.judge", "./no/judge"],
        "evaluation.judge=./no/judge: model folder not found",
    ),
    "output below a regular file": (
        {"p.jsonl": jsonl(GOOD), "file.txt": "x"},
        ["--output", "{dir}/file.txt/run"],
        "cannot write there",
    ),
    # The other commands: (files, arguments, fragment, command)
    "evaluate: adapters folder missing": (
        {"p.jsonl": jsonl(GOOD)},
        ["--model", "{model}", "--prompts", "{dir}/p.jsonl", "--adapters", "{dir}/none"],
        "--adapters {dir}/none: no adapters.safetensors there",
        "evaluate",
    ),
    "export: malformed repo id": (
        {},
        ["--adapters", "{run}", "--output", "{dir}/f", "--upload-repo", "not a repo"],
        "--upload-repo 'not a repo': use the form user/name",
        "export",
    ),
    "export: malformed pairs repo id": (
        {},
        ["--adapters", "{run}", "--output", "{dir}/f", "--upload-pairs-repo", "me/x/y"],
        "--upload-pairs-repo 'me/x/y': use the form user/name",
        "export",
    ),
    "export: pairs upload without a token": (
        {},
        ["--adapters", "{run}", "--output", "{dir}/f", "--upload-pairs-repo", "me/pairs"],
        "no Hugging Face token",
        "export",
    ),
    "export: output is the run": (
        {},
        ["--adapters", "{run}", "--output", "{run}", "--overwrite"],
        "is the adapters folder",
        "export",
    ),
    "export: output holds the run": (
        {},
        ["--adapters", "{run}", "--output", "{run}/..", "--overwrite"],
        "holds the adapters folder",
        "export",
    ),
    "export: argument missing": ({}, ["--adapters", "{run}"], "required: --output", "export"),
    "export: unknown GGUF type": (
        {},
        ["--adapters", "{run}", "--output", "{dir}/f", "--gguf", "q4"],
        "argument --gguf: invalid choice: 'q4'",
        "export",
    ),
    "export: GGUF of an unsupported architecture": (
        {},
        ["--adapters", "{run_other_arch}", "--output", "{dir}/f", "--gguf", "f16"],
        "model_type 'gemma2' has no GGUF export here; supported: llama, qwen2",
        "export",
    ),
    # Files a run reads back, damaged or hand-edited: resume and export read them
    "resume: token id past the vocabulary": (
        {},
        ["--resume", "{run_bad_id}"],
        "pairs.jsonl:2: 'chosen_ids' must be a non-empty list of token ids below the vocabulary",
        "resume",
    ),
    "export: token id past the vocabulary": (
        {},
        ["--adapters", "{run_bad_id}", "--output", "{dir}/f"],
        "pairs.jsonl:2: 'chosen_ids' must be a non-empty list of token ids below the vocabulary",
        "export",
    ),
    "resume: reference log-prob not finite": (
        {},
        ["--resume", "{run_nan}"],
        "pairs.jsonl:1: 'reference_logps' must hold finite",
        "resume",
    ),
    "resume: pair row not an object": (
        {},
        ["--resume", "{run_list_row}"],
        "pairs.jsonl:1: each line must be a JSON object",
        "resume",
    ),
    "resume: answer token id past the vocabulary": (
        {},
        ["--resume", "{run_bad_response}"],
        "responses.chosen.jsonl: response 2 is not an index, token ids below",
        "resume",
    ),
    "resume: answer without its finished flag": (
        {},
        ["--resume", "{run_response_flag}"],
        "responses.chosen.jsonl: response 1 is not an index, token ids",
        "resume",
    ),
    "resume: checkpoint state damaged": (
        {},
        ["--resume", "{run_bad_state}"],
        "checkpoint/state.json: needs whole numbers 'step' and 'batches_done'",
        "resume",
    ),
    "resume: damaged config.yaml": (
        {},
        ["--resume", "{run_bad_yaml}"],
        "config.yaml line 2: not valid YAML",
        "resume",
    ),
    "export: damaged config.yaml": (
        {},
        ["--adapters", "{run_bad_yaml}", "--output", "{dir}/f"],
        "config.yaml line 2: not valid YAML",
        "export",
    ),
    "export: empty config.yaml": (
        {},
        ["--adapters", "{run_empty_yaml}", "--output", "{dir}/f"],
        "config.yaml: model.path is not set",
        "export",
    ),
    "evaluate: empty config.yaml": (
        {},
        ["--adapters", "{run_empty_yaml}"],
        "model.path is not set",
        "evaluate",
    ),
    "export: damaged adapter_config.json": (
        {},
        ["--adapters", "{run_bad_adapter_config}", "--output", "{dir}/f"],
        "adapter_config.json: not valid JSON",
        "export",
    ),
    "evaluate: damaged adapter_config.json": (
        {"p.jsonl": jsonl(GOOD)},
        ["--adapters", "{run_bad_adapter_config}", "--prompts", "{dir}/p.jsonl", *FAST[:2]],
        "adapter_config.json: not valid JSON",
        "evaluate",
    ),
    "evaluate: output is a file": (
        {"p.jsonl": jsonl(GOOD), "taken": "a file"},
        ["--adapters", "{run}", "--prompts", "{dir}/p.jsonl", "--output", "{dir}/taken"],
        "taken: exists and is not a folder",
        "evaluate",
    ),
    "evaluate: adapters cut short": (
        {"p.jsonl": jsonl(GOOD)},
        ["--adapters", "{run_cut_adapters}", "--prompts", "{dir}/p.jsonl", *FAST[:2]],
        "adapters.safetensors: cannot read the adapters",
        "evaluate",
    ),
    # A run resumes only as it started: held to its record (run.json), not to config.yaml
    "resume: lora.rank edited in config.yaml": (
        {},
        ["--resume", "{run_rank_edited}"],
        "belongs to another run (lora.rank was 8 when it started, now 4)",
        "resume",
    ),
    "resume: another model of the same shape at model.path": (
        {},
        ["--resume", "{run_model_swapped}"],
        "the model at model.path changed since the run started (model.safetensors differs)",
        "resume",
    ),
    "resume: checkpoint step past the run's total": (
        {},
        ["--resume", "{run_step_past}"],
        "checkpoint/state.json: step 5 is past this run's 1 steps",
        "resume",
    ),
    # Output places where a run's or an export's files would mix with others'
    "output is the model folder": (
        {"p.jsonl": jsonl(GOOD)},
        ["--output", "{model}"],
        "is the model folder",
    ),
    "export: output is empty (the working directory)": (
        {},
        ["--adapters", "{run}", "--output", ""],
        "--output is empty (the working directory)",
        "export",
    ),
    # Encodings and text: one reader decides for every file
    "json escape of a lone surrogate": (
        {"p.jsonl": jsonl(GOOD) + '{"prompt": "x\\ud800"}\n'},
        [],
        "p.jsonl:4: a \\u escape names a lone surrogate",
    ),
    "NUL byte in a prompt file": (
        {"p.jsonl": jsonl(GOOD).encode() + b'{"prompt": "x\x00"}\n'},
        [],
        "p.jsonl:4: holds a NUL byte",
    ),
    # YAML and settings
    "duplicate key in the config": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": "training:\n  beta: 0.1\n  beta: 0.2\n"},
        ["--config", "{dir}/c.yaml"],
        "c.yaml line 3: duplicate key 'beta' (first at line 2)",
    ),
    "seed past numpy's range": (
        {"p.jsonl": jsonl(GOOD)},
        ["--training.seed", "4294967296"],
        "'training.seed' must be at most 4294967295",
    ),
    "template with a format spec": (
        {"p.jsonl": jsonl(GOOD)},
        ["--data.prompt_template", "Q: {prompt:>5}"],
        "'data.prompt_template' has the field '{prompt:>5}'",
    ),
    "config is a FIFO": (
        {"p.jsonl": jsonl(GOOD), "c.yaml": FIFO},
        ["--config", "{dir}/c.yaml"],
        "c.yaml: is a FIFO (named pipe), not a config file",
    ),
    "output where nothing may be written": (
        {"p.jsonl": jsonl(GOOD)},
        ["--output", "/sys/mipo-out"],  # sysfs: even root may not make a folder there
        "/sys/mipo-out: cannot write there (Operation not permitted); choose another output.dir",
    ),
    "held-out label malformed": (
        {"p.jsonl": jsonl(GOOD), "h.jsonl": jsonl(GOOD + [{"prompt": "x", "answer": [7]}])},
        ["--evaluation.prompts", "{dir}/h.jsonl"],
        "h.jsonl:4: 'answer' must be a number or a choice letter A-E",
    ),
    # security: a run folder's config.yaml never lets its model run code (a note says so)
    "security: shared run asks to run its model's code": (
        {"p.jsonl": jsonl(GOOD)},
        ["--adapters", "{run_remote_code}", "--prompts", "{dir}/p.jsonl"],
        "contains custom code which must be executed",
        "evaluate",
    ),
}


@pytest.fixture(scope="module")
def models(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    no_tok, no_template, corrupt = root / "no_tok", root / "no_template", root / "corrupt"
    for folder in (no_tok, no_template, corrupt):
        shutil.copytree(toy_model_dir, folder)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (corrupt / "model.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage-not-weights"
    )
    earlier = root / "earlier"
    earlier.mkdir()
    (earlier / "config.yaml").write_text("model:\n  path: x\n")
    (earlier / "pairs.jsonl").write_text("{}\n")
    (earlier / "written.jsonl").write_text('{"name": "config.yaml"}\n{"name": "pairs.jsonl"}\n')
    runs = root / "runs"  # a finished run, alone in its parent folder
    prompts = root / "prompts.jsonl"
    prompts.write_text(jsonl(GOOD))
    args = ["--model", str(toy_model_dir), "--prompts", str(prompts), "--output", str(runs / "run")]
    from mipo_mlx import train

    said = io.StringIO()  # in this process, as the cases run (quiet unless it fails)
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        assert train.main([*args, "--iters", "1", *FAST]) == 0, said.getvalue()
    damaged = {}
    for name, damage in (
        ("run_bad_id", lambda rows: rows[1]["chosen_ids"].append(10**6)),
        ("run_nan", lambda rows: rows[0]["reference_logps"].update(chosen=float("nan"))),
        ("run_list_row", lambda rows: rows.__setitem__(0, [1, 2])),
        ("run_bad_yaml", None),
        ("run_bad_response", "responses"),
        ("run_response_flag", "responses"),
        ("run_bad_state", "state"),
        ("run_empty_yaml", "file"),
        ("run_bad_adapter_config", "file"),
        ("run_cut_adapters", "file"),
        ("run_other_arch", "base"),
        ("run_rank_edited", "resume"),
        ("run_model_swapped", "resume"),
        ("run_step_past", "resume"),
        ("run_remote_code", "remote"),
    ):
        copy = root / name / "run"
        shutil.copytree(runs / "run", copy)
        damaged[name] = copy
        if damage == "file":  # one file of a finished run emptied, edited or cut short
            target, text = {
                "run_empty_yaml": ("config.yaml", b""),
                "run_bad_adapter_config": ("adapter_config.json", b'{"lora_parameters": '),
                "run_cut_adapters": (
                    "adapters.safetensors",
                    (copy / "adapters.safetensors").read_bytes()[:100],
                ),
            }[name]
            (copy / target).write_bytes(text)
            continue
        if damage is None:
            (copy / "config.yaml").write_text("model: [\n")
            continue
        if damage == "resume":  # edited after the run: a setting, the model, the checkpoint
            edit_for_resume(name, copy, toy_model_dir)
            continue
        if damage == "base":  # the base model's config.json names an architecture GGUF lacks
            base = root / name / "base"
            shutil.copytree(toy_model_dir, base)
            config = json.loads((base / "config.json").read_text())
            (base / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
            text = (copy / "config.yaml").read_text()
            (copy / "config.yaml").write_text(text.replace(str(toy_model_dir), str(base)))
            continue
        if damage == "remote":  # shared: its base model ships code, its config asks to run it
            base = remote_code_model(toy_model_dir, root / name / "base")
            text = (copy / "config.yaml").read_text().replace(str(toy_model_dir), str(base))
            text = text.replace("trust_remote_code: false", "trust_remote_code: true")
            (copy / "config.yaml").write_text(text)
            continue
        if damage == "state":  # a run killed in training, its checkpoint's state edited
            (copy / "adapters.safetensors").unlink()
            (copy / "checkpoint" / "state.json").write_text('{"step": "1"}')
            continue
        if damage == "responses":  # a run killed while answering, its answers edited
            (copy / "pairs.jsonl").unlink()
            lines = (copy / "responses.chosen.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            if name == "run_bad_response":
                rows[1]["token_ids"].append(10**6)
            else:
                del rows[0]["finished"]
            (copy / "responses.chosen.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
            continue
        rows = [json.loads(line) for line in (copy / "pairs.jsonl").read_text().splitlines()]
        damage(rows)
        (copy / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        **damaged,
        "model_no_tok": no_tok,
        "model_no_template": no_template,
        "model_corrupt": corrupt,
        "earlier_run": earlier,
        "run": runs / "run",
        "model": toy_model_dir,
    }


def edit_for_resume(name, run, model_dir):
    config = (run / "config.yaml").read_text()
    if name == "run_rank_edited":
        (run / "config.yaml").write_text(config.replace("rank: 8", "rank: 4"))
    elif name == "run_model_swapped":  # the same names and shapes, other weights
        other = shutil.copytree(model_dir, run.parent / "base")
        weights = mx.load(str(other / "model.safetensors"))
        mx.save_safetensors(str(other / "model.safetensors"), {k: -v for k, v in weights.items()})
        (run / "config.yaml").write_text(config.replace(str(model_dir), str(other)))
    else:
        state = json.loads((run / "checkpoint" / "state.json").read_text())
        (run / "checkpoint" / "state.json").write_text(
            json.dumps({**state, "step": 5, "batches_done": 5})
        )


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(name, models, toy_model_dir, tmp_path):
    """Write the case's files: (command module, its arguments, the fragment the message must
    hold, the case's command, the folders that must stay as they are, their contents now)."""
    files, extra, fragment, *command = CASES[name]
    command = command[0] if command else "train"
    for file_name, content in files.items():
        target = tmp_path / file_name
        if content == FIFO:
            os.mkfifo(target)
            continue
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    fill = {**{k: str(v) for k, v in models.items()}, "dir": str(tmp_path)}
    extra = [
        a.format(**fill) if "{" in a and "}" in a and not a.startswith("Q:") else a for a in extra
    ]
    fragment = fragment.format(**fill) if "{dir}" in fragment else fragment
    args = extra
    module = "train" if command == "resume" else command
    if command == "train":
        args = [
            "--model",
            str(toy_model_dir),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--output",
            str(out),
            "--generation.max_tokens",
            "4",
            "--generation.truncated",
            "keep",
            "--iters",
            "1",
            *extra,
        ]
    named = " ".join(CASES[name][1])
    watched = [out] + [models["earlier_run"]] * ("{earlier_run}" in named)
    watched += [models["run"].parent] * ("{run}" in named)
    watched += [
        Path(fill[k]).parent for k in models if k.startswith("run_") and f"{{{k}}}" in named
    ]
    return module, args, fragment, command, watched, [snapshot(w) for w in watched]


def no_hub_login(tmp_path) -> dict[str, str]:
    """The environment of a machine with no Hugging Face token and an empty HF home."""
    return {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "no-hf-home")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, models, toy_model_dir, tmp_path, monkeypatch, capfd):
    module, args, fragment, command, watched, before = prepare(
        name, models, toy_model_dir, tmp_path
    )
    import huggingface_hub.constants  # its token file's path was read from HF_HOME at import

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", f"{tmp_path}/no-hf-home/token")
    done = run_main(module, args, capfd, cwd=tmp_path, env=no_hub_login(tmp_path))
    check(done, command, fragment, watched, before)


# End to end, one case of each command in `python -m mipo_mlx.<command>`'s own process: the
# exit status and stderr of the real command (what the package prints as it imports included)
IN_ITS_OWN_PROCESS = [
    "malformed json line",
    "evaluate: adapters folder missing",
    "export: malformed repo id",
]


@pytest.mark.parametrize("name", IN_ITS_OWN_PROCESS)
def test_bad_input_in_its_own_process(name, models, toy_model_dir, tmp_path):
    module, args, fragment, command, watched, before = prepare(
        name, models, toy_model_dir, tmp_path
    )
    done = subprocess.run(
        [sys.executable, "-m", f"mipo_mlx.{module}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **no_hub_login(tmp_path)},
    )
    check(done, command, fragment, watched, before)


def check(done, command, fragment, watched, before):
    """Exit status 2, one line naming the input, no traceback, nothing written or lost."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-1500:]
    assert "Traceback" not in done.stderr
    said = [line for line in lines if not line.startswith("note:")]
    if command == "resume":  # a resumed run may first say what it reuses
        said = [line for line in said if line.startswith("error:")]
    assert len(said) == 1, done.stderr
    assert lines[-1].startswith("error:") and fragment in lines[-1], lines[-1]
    assert [snapshot(w) for w in watched] == before  # nothing written, nothing lost


def test_table_has_every_case():
    assert len(CASES) >= 66  # 29 before the reliability round, and the cases it added
