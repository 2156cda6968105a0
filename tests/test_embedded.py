"""The embedded default: the shipped model loads with mlx-lm, and the no-argument run works."""

import json
import shlex
import subprocess
import sys

import pytest

from mipo_mlx.embedded import HERE

MODEL = HERE / "model"


@pytest.fixture(scope="module")
def embedded():
    from mlx_lm import load

    return load(str(MODEL))


def test_shipped_files_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (MODEL / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in MODEL.iterdir()}


def test_loads_with_mlx_lm_and_chat_template_renders(embedded):
    _, tokenizer = embedded
    messages = [{"role": "user", "content": "Tom has 3 apples. How many?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text == "<|im_start|>user\nTom has 3 apples. How many?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_digits_are_single_tokens(embedded):
    _, tokenizer = embedded
    ids = tokenizer.encode("1234", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4"]


@pytest.mark.integration  # a whole run of the embedded default in a process of its own
def test_default_run_short_mode(tmp_path):
    """`python -m mipo_mlx.train` with only size limits: the embedded model, prompts and held-out
    set."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "mipo_mlx.train",
        "--iters",
        "2",
        "--data.limit",
        "16",
        "--evaluation.limit",
        "8",
        "--guard.limit",
        "8",
        "--evaluation.max_tokens",
        "24",
        "--generation.max_tokens",
        "48",
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # Both families: accuracy for the problems, compliance for the requirements.
    for row in ("| accuracy |", "| PMI (nats) |", "| compliance (well-formed answers) |"):
        assert row in done.stdout, row
    assert "| well-formed |" in done.stdout and str(out) in done.stdout
    for name in (
        "eval.json",
        "eval.md",
        "eval.png",
        "training.png",
        "adapters.safetensors",
        "pairs.jsonl",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"base", "mipo"} and results["base"]["n"] == 8
    assert results["base"]["labelled"] == 4  # the families alternate in the shipped files
    strategies = {json.loads(line)["negatives"] for line in (out / "pairs.jsonl").open()}
    assert strategies == {"no_context", "random"}  # pairs.negatives: mixed
    # Progress for every long stage
    assert "generate chosen" in done.stderr and "train |" in done.stderr
    # It ends with where its outputs are and the next three commands, each runnable as printed.
    tail = done.stdout.strip().splitlines()[-5:]
    assert (
        tail[0].startswith(f"outputs in {out}: adapters.safetensors, eval.md")
        and tail[1] == "next:"
    )
    commands = [shlex.split(line.split(":  ", 1)[1]) for line in tail[2:]]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "mlx_lm"],
        ["python", "-m", "mipo_mlx.evaluate"],
        ["python", "-m", "mipo_mlx.export"],
    ]
    ran = [
        subprocess.run(
            [sys.executable, *c[1:]], capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        for c in commands
    ]
    assert all(r.returncode == 0 for r in ran), [r.stderr[-800:] for r in ran]
    first = json.loads((HERE / "data" / "heldout.jsonl").open().readline())["prompt"]
    assert commands[0][-1] == first  # a held-out prompt: not one the adapters trained on
    assert ran[0].stdout.count("==========") == 2  # mlx_lm's frame around the answer
    assert json.loads((out / "eval-2.json").read_text())["mipo"]["n"] == 8  # run's eval kept
    assert json.loads((tmp_path / "out-fused" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_build_is_reproducible(tmp_path):
    """Two short builds write the same bytes: weights, tokenizer and prompt files; the
    tokenizer and prompt files are the shipped ones (the full build only trains longer)."""
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "mipo_mlx.embedded.build", "--steps", "20"]
        done = subprocess.run(
            cmd + ["--output", str(tmp_path / name)], capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr
    files = ["model/model.safetensors", "model/tokenizer.json", "model/config.json"]
    files += [f"data/{split}.jsonl" for split in ("train", "valid", "heldout")]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in files[1:]:
        assert (tmp_path / "a" / name).read_bytes() == (HERE / name).read_bytes(), name
