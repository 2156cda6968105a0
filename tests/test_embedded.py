"""The embedded default: the shipped model loads with mlx-lm, and the no-argument run works."""

import json
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
        "--evaluation.max_tokens",
        "24",
        "--generation.max_tokens",
        "48",
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (
        "| accuracy |" in done.stdout
        and "| PMI (nats) |" in done.stdout
        and str(out) in done.stdout
    )
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
    # Progress for every long stage
    assert "generate chosen" in done.stderr and "train |" in done.stderr
