"""Export: fused == base + adapters, the folder loads with mlx-lm, the card, dry runs and
uploads."""

import json
import os
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import pytest

from mipo_mlx import export
from mipo_mlx.core.errors import UserError
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.publish import hub
from mipo_mlx.publish.card import front_matter

from .builders import write_prompts

TRAIN = (
    "--generation.max_tokens 10 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 5e-3 --iters 6 --training.batch_size 4 --lora.rank 4 "
    "--data.valid_fraction 0.25"
).split()


def train_run(model_dir, root, *extra):
    prompts = write_prompts(root / "prompts.jsonl", n=12)
    out = root / "run"
    cmd = [
        sys.executable,
        "-m",
        "mipo_mlx.train",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        *TRAIN,
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def plain_run(toy_model_dir, tmp_path_factory):
    return train_run(toy_model_dir, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def quantized_run(toy_model_dir, tmp_path_factory):
    return train_run(
        toy_model_dir,
        tmp_path_factory.mktemp("q4"),
        "--model.quantize_bits",
        "4",
        "--model.quantize_group_size",
        "32",
        "--model.quantize_on_cpu",
        "true",
    )


def logits_of(model, run):
    batch = pack_pairs(read_pairs(run / "pairs.jsonl")[:4], 0)
    return model(batch.inputs)


@pytest.mark.parametrize("which", ["plain_run", "quantized_run"])
def test_fused_equals_base_plus_adapters(which, request, tmp_path, capsys):
    from mlx_lm import load

    from mipo_mlx.core.config import ModelConfig
    from mipo_mlx.engine import model as mdl
    from mipo_mlx.engine.lora import load_adapters

    run = request.getfixturevalue(which)
    assert export.main(["--adapters", str(run), "--output", str(tmp_path / "fused")]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    fused, tokenizer = load(str(tmp_path / "fused"))
    quantized = which == "quantized_run"
    base, _, _ = mdl.load(
        ModelConfig(
            path=json.loads((run / "adapter_config.json").read_text())["base_model"],
            quantize_bits=4 if quantized else None,
            quantize_group_size=32,
            quantize_on_cpu=quantized,
        )
    )
    load_adapters(base, run)
    diff = mx.abs(logits_of(fused, run) - logits_of(base, run)).max().item()
    assert diff < 1e-3
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")  # the chat template came along
    names = {k for k, _ in __import__("mlx.utils", fromlist=["x"]).tree_flatten(fused.parameters())}
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)


def test_card_front_matter(plain_run, tmp_path):
    assert export.main(["--adapters", str(plain_run), "--output", str(tmp_path / "fused")]) == 0
    card = (tmp_path / "fused" / "README.md").read_text()
    meta = front_matter(card)
    base = json.loads((plain_run / "adapter_config.json").read_text())["base_model"]
    assert meta["base_model"] == base and meta["library_name"] == "mlx"
    assert {"mipo", "dpo", "lora", "mlx"} <= set(meta["tags"])
    assert (
        "negatives: `random`" in card and "pairs: 12" in card and "fused vs base + adapters" in card
    )


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw))


def test_dry_run_lists_files_and_sends_nothing(plain_run, tmp_path, monkeypatch, capsys):
    fake = FakeHub()
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code = export.main(
        [
            "--adapters",
            str(plain_run),
            "--output",
            str(tmp_path / "f"),
            "--upload-repo",
            "me/tiny",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and fake.calls == []
    assert "would upload to model repo me/tiny (public)" in out and "model.safetensors" in out
    assert "dry run: nothing was sent" in out


def test_upload_through_stand_in(plain_run, tmp_path, monkeypatch, capsys):
    fake = FakeHub()
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    code = export.main(
        [
            "--adapters",
            str(plain_run),
            "--output",
            str(tmp_path / "f"),
            "--upload-repo",
            "me/tiny",
            "--private",
            "--upload-pairs-repo",
            "me/tiny-pairs",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    (_, create), (_, upload), (_, create_ds), (_, upload_ds) = fake.calls
    assert (
        create["repo_id"] == "me/tiny"
        and create["private"] is True
        and create["repo_type"] == "model"
    )
    assert upload["folder_path"] == str(tmp_path / "f") and upload["repo_id"] == "me/tiny"
    assert export.MARKER not in upload["allow_patterns"]  # the marker stays home
    assert "model.safetensors" in upload["allow_patterns"]
    sent = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(sent)
    assert create_ds["repo_type"] == "dataset" and upload_ds["path_in_repo"] == "pairs.jsonl"
    assert "hf_secret_token_value" not in captured.out + captured.err
    assert not any(
        "hf_secret_token_value" in p.read_text(errors="ignore")
        for p in (tmp_path / "f").iterdir()
        if p.suffix in (".md", ".json", ".jinja")
    )


def run_export(*args):
    return subprocess.run(
        [sys.executable, "-m", "mipo_mlx.export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_TOKEN": "", "HF_HOME": "/nonexistent"},
    )


def assert_user_error(done, fragment):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration  # five exports, each in a process of its own
def test_errors(plain_run, toy_model_dir, tmp_path):
    assert_user_error(
        run_export("--adapters", str(tmp_path / "none"), "--output", str(tmp_path / "o")),
        "not found",
    )
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken)
    (broken / "adapters.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(
        run_export("--adapters", str(broken), "--output", str(tmp_path / "o1")),
        "cannot read the adapters",
    )
    other = tmp_path / "other"
    shutil.copytree(plain_run, other)
    from mipo_mlx.engine.toy import build_model_folder

    wider = build_model_folder(tmp_path / "wider", hidden_size=128, intermediate_size=256)
    cfg = (other / "config.yaml").read_text().replace(str(toy_model_dir), str(wider))
    (other / "config.yaml").write_text(cfg)
    assert_user_error(
        run_export("--adapters", str(other), "--output", str(tmp_path / "o2")),
        "do not fit this base",
    )
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_user_error(
        run_export("--adapters", str(plain_run), "--output", str(existing)), "--overwrite"
    )
    assert (existing / "keep.txt").read_text() == "mine"
    assert_user_error(
        run_export(
            "--adapters", str(plain_run), "--output", str(tmp_path / "o3"), "--upload-repo", "me/x"
        ),
        "no Hugging Face token",
    )
    assert not (tmp_path / "o3").exists()


@pytest.mark.integration  # eleven exports, each in a process of its own
def test_export_never_replaces_the_run_or_what_it_did_not_write(plain_run, tmp_path):
    """The adapters folder, a folder that holds it and one inside it are refused, --overwrite
    or not; --overwrite replaces only a folder an earlier export wrote."""
    parent = tmp_path / "parent"
    run = parent / "run"
    shutil.copytree(plain_run, run)
    (parent / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    for output, fragment in (
        (run, "is the adapters folder"),
        (parent, "holds the adapters folder"),
        (run / "fused", "is inside the adapters folder"),
        (run / ".." / "run", "is the adapters folder"),  # the same folder, spelled apart
    ):
        for extra in ((), ("--overwrite",)):
            assert_user_error(
                run_export("--adapters", str(run), "--output", str(output), *extra), fragment
            )
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert_user_error(
        run_export("--adapters", str(run), "--output", str(mine), "--overwrite"),
        "not a folder mipo_mlx.export wrote",
    )
    assert (mine / "keep.txt").read_text() == "mine"
    fused = tmp_path / "fused"
    assert run_export("--adapters", str(run), "--output", str(fused)).returncode == 0
    assert (fused / export.MARKER).is_file()
    again = run_export("--adapters", str(run), "--output", str(fused), "--overwrite")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "the following arguments are required: --adapters, --output"),
        (["--adapters", "a", "--output", "b", "--quantize", "3"], "invalid choice: 3"),
        (["--adapters", "a", "--output", "b", "--overwrit"], "unrecognized arguments"),
    ],
)
def test_argument_errors_are_one_line(args, fragment):
    assert_user_error(run_export(*args), fragment)


def test_requantize_reports_drift(plain_run, tmp_path, capsys):
    assert (
        export.main(
            ["--adapters", str(plain_run), "--output", str(tmp_path / "q"), "--quantize", "4"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "re-quantized to 4 bits vs base + adapters (drift)" in out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4


def test_dequantized_export_loads_in_transformers(plain_run, tmp_path):
    """The de-quantized folder is a plain HF llama checkpoint (runs where torch is installed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from mlx_lm import load

    assert export.main(["--adapters", str(plain_run), "--output", str(tmp_path / "f")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f"), dtype=torch.float32)
    ids = read_pairs(plain_run / "pairs.jsonl")[0].prompt_ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    model, _ = load(str(tmp_path / "f"))
    assert float(np.abs(np.array(model(mx.array([ids]))) - expected).max()) < 1e-3


class Unreachable(FakeHub):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def create_repo(self, **kw):
        raise self.error


class Refused(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error for url https://huggingface.co/api/repos/create")
        self.response = type("Response", (), {"status_code": status})()


@pytest.mark.parametrize(
    "error, fragment",
    [
        (ConnectionError("[Errno -3] Temporary failure in name resolution"), "could not reach"),
        (TimeoutError("timed out after 10 s (token hf_secret_token_value)"), "could not reach"),
        (Refused(401), "the Hub refused the token for me/tiny (HTTP 401)"),
        (Refused(500), "the Hub answered HTTP 500 for me/tiny"),
    ],
)
def test_upload_failures_are_one_line_without_the_token(tmp_path, monkeypatch, error, fragment):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(hub, "hub_api", lambda: Unreachable(error))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    with pytest.raises(UserError) as caught:
        hub.publish(tmp_path, "me/tiny", private=False, dry_run=False)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and "publish again" in message
    assert "hf_secret_token_value" not in message


def test_export_leaves_the_users_old_and_partial_folders_alone(plain_run, tmp_path, capsys):
    out = tmp_path / "m"
    for name in ("m.old", "m.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the user's")
    assert export.main(["--adapters", str(plain_run), "--output", str(out)]) == 0
    assert export.main(["--adapters", str(plain_run), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old", "m.partial"]
    for name in ("m.old", "m.partial"):
        assert (tmp_path / name / "mine.txt").read_text() == "the user's"


def test_export_refuses_a_link_nothing_and_the_working_directory(
    plain_run, tmp_path, monkeypatch, capsys
):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    for given, fragment in (
        ("link", "--output link: is a symbolic link"),
        ("", "--output is empty (the working directory)"),
        (".", "--output .: is the working directory"),
    ):
        assert export.main(["--adapters", str(plain_run), "--output", given]) == 2
        assert fragment in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert not any((tmp_path / "real").iterdir())


def test_a_second_export_to_the_same_folder_is_refused_naming_the_first(plain_run, tmp_path):
    from mipo_mlx.core.files import folder_lock

    out = tmp_path / "f"
    with folder_lock(out, "--output", replaced=True):  # the first export, holding it
        done = run_export("--adapters", str(plain_run), "--output", str(out))
    assert_user_error(done, f"{out}: in use by process {os.getpid()}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class Terminated(Exception):
    pass


def test_sigterm_during_export_stops_it_and_leaves_nothing(plain_run, tmp_path, monkeypatch):
    """The first SIGTERM, mid-save: one line, exit 130, no partial folder, no lock file."""
    from mipo_mlx.publish import fuse

    real_save = fuse.save_folder

    def save_then_terminated(folder, *args):
        real_save(folder, *args)  # a whole model's files in the partial folder
        os.kill(os.getpid(), signal.SIGTERM)

    def guard(signum, frame):  # were export to install no handler of its own
        raise Terminated

    monkeypatch.setattr(fuse, "save_folder", save_then_terminated)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        out = tmp_path / "f"
        code = export.main(["--adapters", str(plain_run), "--output", str(out)])
    finally:
        assert signal.getsignal(signal.SIGTERM) is guard  # put back as it was
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(plain_run, tmp_path):
    """A file-size limit (SIGXFSZ ignored: writes past it fail as on a full disk), set once
    the libraries are loaded, as in test_resume."""
    small_disk = (
        "import runpy, signal, resource, sys, mipo_mlx, mlx.core, mlx_lm\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
        "sys.argv = ['mipo_mlx.export', *sys.argv[1:]]\n"
        "runpy.run_module('mipo_mlx.export', run_name='__main__')\n"
    )
    out = tmp_path / "f"
    done = subprocess.run(
        [sys.executable, "-c", small_disk, "--adapters", str(plain_run), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert "could not write the fused weights" in errors[0]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
