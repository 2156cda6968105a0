"""GGUF export: the file's layout and metadata read back with gguf's own reader, llama's
rotary permutation proved on its own, and the file loaded in llama.cpp with its logits
compared with the fused MLX model's (skipped, with the reason, where llama-cpp-python is not
installed: it builds from source, see README)."""

import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx import export
from mipo_mlx.core.errors import UserError
from mipo_mlx.engine.toy import DEFAULT_CORPUS, build_model_folder
from mipo_mlx.publish import gguf_check, gguf_file

from .builders import write_prompts

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (dev extra)")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP,
    reason="llama-cpp-python is not installed (pip install -e '.[gguf-check]'; it builds "
    "llama.cpp from source)",
)
EMBEDDED = Path(__file__).parents[1] / "mipo_mlx" / "embedded" / "model"
TRAIN = (
    "--generation.max_tokens 12 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 5e-3 --iters 4 --training.batch_size 4 --lora.rank 4 "
    "--data.valid_fraction 0.25"
).split()
LLAMA3_ROPE = {  # Llama 3.2's own settings
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rope_theta": 500000.0,
    "head_dim": 16,
    "max_position_embeddings": 131072,
}


def corpus(n: int = 400) -> list[str]:
    """Text with numbers, contractions, case, accents, CJK and whitespace runs, so that the
    tokenizers trained on it learn merges that a wrong pre-tokenizer would split otherwise."""
    rng = random.Random(0)
    words = "the cat's dog I'm they'll we've HELLO World café naïve 東京 apples pens".split()
    ends = ["", ",", ".", "!\n", "\n\n", "  "]

    def word() -> str:
        return rng.choice(words) + rng.choice(ends) + str(rng.randint(0, 99999))

    return DEFAULT_CORPUS + [" ".join(word() for _ in range(12)) for _ in range(n)]


TEXT = {"corpus": corpus(), "vocab_size": 1024}
MODELS = {  # name: (builder arguments, llama.cpp's pre-tokenizer name for it)
    "llama": ({"architecture": "llama", **TEXT}, "gpt-2"),
    "llama3": (
        {"architecture": "llama", "llama3_split": True, "extra_config": LLAMA3_ROPE, **TEXT},
        "llama-bpe",
    ),
    # transformers gives a qwen2 model the Qwen2 tokenizer's own pre-tokenizer
    "qwen2": ({"architecture": "qwen2", "tie_word_embeddings": False, **TEXT}, "qwen2"),
}


def train(model_dir: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(root / "prompts.jsonl", n=12)
    out = root / "run"
    cmd = [sys.executable, "-m", "mipo_mlx.train", "--model", str(model_dir)]
    cmd += ["--prompts", str(prompts), "--output", str(out), *TRAIN]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short finished run on each test model."""
    root = tmp_path_factory.mktemp("gguf")
    found = {}
    for name, (kwargs, _) in MODELS.items():
        model = build_model_folder(root / name / "model", **kwargs)
        found[name] = train(model, root / name)
    return found


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return train(EMBEDDED, tmp_path_factory.mktemp("gguf-embedded"))


def export_gguf(run: Path, out: Path, file_type: str, capsys) -> str:
    assert export.main(["--adapters", str(run), "--output", str(out), "--gguf", file_type]) == 0
    return capsys.readouterr().out


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: v.contents() for k, v in reader.fields.items()}, reader.tensors


@pytest.mark.parametrize("name", list(MODELS))
def test_layout_and_tokenizer_metadata(name, runs, tmp_path, capsys):
    """Tensor names and types as llama.cpp names them; the tokenizer in the metadata."""
    from transformers import AutoTokenizer

    out = tmp_path / "fused"
    printed = export_gguf(runs[name], out, "q8_0", capsys)
    meta, tensors = fields(out / "model-q8_0.gguf")
    config = json.loads((out / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert meta["general.architecture"] == config["model_type"]
    assert meta[f"{config['model_type']}.block_count"] == layers
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    per_layer += ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    want = {"token_embd.weight", "output_norm.weight"}
    want |= {f"blk.{i}.{t}.weight" for i in range(layers) for t in per_layer}
    if config["model_type"] == "qwen2":
        want |= {f"blk.{i}.attn_{t}.bias" for i in range(layers) for t in "qkv"}
    if not config["tie_word_embeddings"]:
        want.add("output.weight")
    if name == "llama3":
        want.add("rope_freqs.weight")
    types = {t.name: t.tensor_type.name for t in tensors}
    assert set(types) == want
    for tensor, kind in types.items():  # norms, biases and rope factors stay float32
        one_d = "norm" in tensor or tensor.endswith(".bias") or tensor == "rope_freqs.weight"
        assert kind == ("F32" if one_d else "Q8_0"), tensor
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert meta["tokenizer.ggml.tokens"] == [t for t, _ in vocab]
    control = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert control == {0, 1, 2}  # <|endoftext|>, <|im_start|>, <|im_end|>
    token_types = meta["tokenizer.ggml.token_type"]
    assert {i for i, t in enumerate(token_types) if t == gguf.TokenType.CONTROL} == control
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.pre"] == MODELS[name][1]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    modelfile = (out / "Modelfile").read_text()
    assert modelfile == f'FROM ./model-q8_0.gguf\nPARAMETER stop "{tokenizer.eos_token}"\n'
    card = (out / "README.md").read_text()
    assert "model-q8_0.gguf" in card and "ollama create" in card
    assert ("Checked in llama.cpp" in card) == HAS_LLAMA_CPP
    assert ("**Not verified**" in card) == (not HAS_LLAMA_CPP) == ("NOT verified" in printed)


def test_without_llama_cpp_the_file_is_kept_and_said_not_verified(
    runs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    out = tmp_path / "fused"
    printed = export_gguf(runs["llama"], out, "f16", capsys)
    assert "model-f16.gguf: NOT verified: llama-cpp-python is not installed" in printed
    assert " vs the fused model" not in printed
    card = (out / "README.md").read_text()
    assert "**Not verified**" in card and "Checked in" not in card
    assert (out / "model-f16.gguf").stat().st_size > 0


def test_f32_weights_round_trip_with_llamas_permutation(runs, tmp_path, capsys):
    """An f32 file holds the fused weights exactly, llama's q and k rows permuted."""
    from mlx_lm import load

    out = tmp_path / "fused"
    export_gguf(runs["llama"], out, "f32", capsys)
    model, _ = load(str(out))
    _, tensors = fields(out / "model-f32.gguf")
    stored = {t.name: np.array(t.data) for t in tensors}
    attention = model.model.layers[1].self_attn
    q = np.array(attention.q_proj.weight)
    assert np.array_equal(stored["blk.1.attn_q.weight"], gguf_file._permute(q, 4))
    assert not np.array_equal(stored["blk.1.attn_q.weight"], q)
    k = np.array(attention.k_proj.weight)
    assert np.array_equal(stored["blk.1.attn_k.weight"], gguf_file._permute(k, 2))
    v = np.array(attention.v_proj.weight)
    assert np.array_equal(stored["blk.1.attn_v.weight"], v)
    assert np.array_equal(stored["token_embd.weight"], np.array(model.model.embed_tokens.weight))


def rotate_halves(x, angles):
    """Hugging Face / MLX rotary (traditional=False): dims i and i + D/2 are a pair."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def rotate_pairs(x, angles):
    """llama.cpp's llama rotary (normal mode): dims 2i and 2i + 1 are a pair."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = np.cos(angles), np.sin(angles)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_permutation_turns_halves_rotary_into_pairs_rotary():
    """Why llama's q and k rows are permuted: with them, llama.cpp's rotary on the permuted
    projection gives the same attention scores as the original model's."""
    rng = np.random.default_rng(0)
    heads, dim, hidden = 3, 8, 12
    wq, wk = rng.normal(size=(2, heads * dim, hidden))
    h_q, h_k = rng.normal(size=(2, hidden))
    freqs = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    scores = []
    for permute, rotate in ((False, rotate_halves), (True, rotate_pairs)):
        q_w = gguf_file._permute(wq, heads) if permute else wq
        k_w = gguf_file._permute(wk, heads) if permute else wk
        q = rotate((q_w @ h_q).reshape(heads, dim), 5 * freqs)  # query at position 5
        k = rotate((k_w @ h_k).reshape(heads, dim), 2 * freqs)  # key at position 2
        scores.append((q * k).sum(-1))
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-12)


def test_llama3_rope_factors_match_mlx_lm():
    """rope_freqs holds the factors mlx-lm's Llama 3 RoPE divides its frequencies by."""
    from mlx_lm.models.rope_utils import initialize_rope

    config = {"hidden_size": 64, "num_attention_heads": 4, **LLAMA3_ROPE}
    factors = gguf_file._llama3_rope_factors(config, LLAMA3_ROPE["rope_scaling"])
    rope = initialize_rope(16, 500000.0, False, LLAMA3_ROPE["rope_scaling"], 4096)
    base = 500000.0 ** (np.arange(0, 16, 2) / 16)  # 1 / unscaled frequency
    np.testing.assert_allclose(np.array(rope._freqs), base * factors, rtol=1e-5)
    assert factors[0] == 1.0 and math.isclose(factors[-1], 32.0)


def test_unsupported_pre_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}})
    )
    with pytest.raises(UserError, match="known: gpt-2, llama-bpe, qwen2, smollm"):
        gguf_file.pre_tokenizer(tmp_path)


def test_unsupported_architecture_stops_before_loading(runs, tmp_path, capsys):
    """Checked from the base's config.json before anything slow; nothing is written."""
    run = tmp_path / "run"
    shutil.copytree(runs["llama"], run)
    base = tmp_path / "base"
    config_yaml = (run / "config.yaml").read_text()
    model_path = next(
        line.split(":", 1)[1].strip() for line in config_yaml.splitlines() if "path:" in line
    )
    shutil.copytree(model_path, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    (run / "config.yaml").write_text(config_yaml.replace(model_path, str(base)))
    argv = ["--adapters", str(run), "--output", str(tmp_path / "f"), "--gguf", "f16"]
    assert export.main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "model_type 'gemma2' has no GGUF export" in printed.err
    assert "supported: llama, qwen2" in printed.err and "fuse" not in printed.out
    assert not (tmp_path / "f").exists()


CHECKED = [(name, t) for name in [*MODELS, "embedded"] for t in gguf_file.FILE_TYPES]


@needs_llama_cpp
@pytest.mark.parametrize("name,file_type", CHECKED)
def test_llama_cpp_logits_match_mlx(name, file_type, request, tmp_path, capsys):
    """The export's own check, read back: llama.cpp's logits within the type's tolerance, the
    same tokenization of every checked text; the figures are printed for BENCHMARKS.md."""
    out = tmp_path / "fused"
    run = request.getfixturevalue("embedded_run" if name == "embedded" else "runs")
    printed = export_gguf(run if name == "embedded" else run[name], out, file_type, capsys)
    line = next(x for x in printed.splitlines() if " vs the fused model: llama.cpp" in x)
    diff = float(line.split("max |logit diff| ")[1].split(",")[0])
    scale = float(line.split("(largest |logit| ")[1].split(")")[0])
    same, texts = line.rsplit(" texts identical", 1)[0].rsplit(" ", 1)[1].split("/")
    assert diff <= gguf_check.TOLERANCE[file_type] * max(scale, 1.0) and same == texts
    size = (out / f"model-{file_type}.gguf").stat().st_size
    with capsys.disabled():
        print(f"\n{name} {file_type}: {size / 1e6:.2f} MB; {line.split(': ', 1)[1]}")
    assert "Checked in llama.cpp" in (out / "README.md").read_text()


@needs_llama_cpp
def test_a_wrong_file_fails_the_check(runs, tmp_path, monkeypatch, capsys):
    """Without the permutation llama.cpp computes another model: the check refuses it."""
    monkeypatch.setattr(gguf_file, "_permute", lambda w, heads: w)
    argv = ["--adapters", str(runs["llama"]), "--output", str(tmp_path / "f"), "--gguf", "f32"]
    assert export.main(argv) == 2
    assert "does not match the fused model in llama.cpp" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert mx.array(0).item() == 0  # MLX still usable after llama.cpp ran in this process


TRICKY = [
    "Tom has 12345 apples, doesn't he? I'm sure they'll say: 3.14!",
    "  two  spaces,\ttab\n\nnewlines\r\n and trailing   ",
    "Émile's café: naïve façade — 東京 2024 🍎🍎",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "1+1=2; 10*10=100; x^2 -> y_3 (a|b) [c] {d} @e #f $5 %6",
]


@needs_llama_cpp
@pytest.mark.parametrize("name", [*MODELS, "embedded"])
def test_llama_cpp_tokenizes_like_hugging_face(name, request, tmp_path, capsys):
    """Digits, contractions, whitespace runs, accents, CJK, emoji and special tokens split the
    same way in llama.cpp as in the Hugging Face tokenizer, for each pre-tokenizer. (Naming
    another pre-tokenizer fails this for the test models; for the embedded model, whose
    digits are single tokens, smollm and gpt-2 split these texts alike.)"""
    import llama_cpp
    from transformers import AutoTokenizer

    out = tmp_path / "fused"
    run = request.getfixturevalue("embedded_run" if name == "embedded" else "runs")
    export_gguf(run if name == "embedded" else run[name], out, "f16", capsys)
    llm = llama_cpp.Llama(str(out / "model-f16.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in TRICKY:
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == hf.encode(text, add_special_tokens=False), text
    llm.close()


def test_upload_sends_the_gguf_file_and_modelfile(runs, tmp_path, monkeypatch, capsys):
    from mipo_mlx.publish import hub

    from .test_export import FakeHub

    fake = FakeHub()
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    out = tmp_path / "f"
    argv = ["--adapters", str(runs["qwen2"]), "--output", str(out), "--gguf", "q8_0"]
    assert export.main([*argv, "--upload-repo", "me/tiny"]) == 0
    (_, create), (_, upload) = fake.calls
    assert {"model-q8_0.gguf", "Modelfile", "README.md"} <= set(upload["allow_patterns"])
    assert upload["folder_path"] == str(out)
    card = (out / "README.md").read_text()
    size = (out / "model-q8_0.gguf").stat().st_size
    assert f"`model-q8_0.gguf`: q8_0, {size / 1e6:.1f} MB" in card
