"""lora.type: each fine-tuning type trains, resumes to the uninterrupted result, gives two ranks
the adapters of one, fuses into weights that match base + adapters (in the Hugging Face format
and in GGUF), and loads in mlx_lm as mlx-lm loads its own adapters of that type."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx import export
from mipo_mlx.core.config import FINE_TUNE_TYPES, LoraConfig, TrainingConfig
from mipo_mlx.data.pair_file import read_pairs
from mipo_mlx.engine import train_state
from mipo_mlx.engine.batching import pack_pairs
from mipo_mlx.engine.lora import (
    adapter_weights,
    adapters_disabled,
    attach_lora,
    base_adapter_weights,
    load_adapters,
)
from mipo_mlx.engine.trainer import fit, make_loss

from .builders import hooks, made_up_pairs, run_args, write_prompts

TRAIN = (
    "--generation.max_tokens 10 --generation.truncated keep --generation.temperature 1.0 "
    "--training.learning_rate 5e-3 --iters 6 --training.batch_size 4 --lora.rank 4 "
    "--data.valid_fraction 0.25 --training.checkpoint_every 2"
).split()


def fresh(toy_model_dir, kind: str):
    from mlx_lm import load

    model, _ = load(str(toy_model_dir))
    attach_lora(model, LoraConfig(type=kind, rank=4), seed=0)
    return model


def lr(kind: str) -> float:
    return 5e-4 if kind == "full" else 5e-3


def scored(n: int):
    pairs = made_up_pairs(n, 200)
    for p in pairs:
        p.reference_logps = {"chosen": -20.0, "rejected": -22.0}
    return pairs


def stream(pairs, size=4):
    k = 0
    while True:
        yield pack_pairs(pairs[k % len(pairs) : k % len(pairs) + size] or pairs[:size], 0)
        k += size


def logits(model, pairs):
    return model(pack_pairs(pairs, 0).inputs)


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_a_new_adapter_is_the_base_and_switching_it_off_gives_the_base(toy_model_dir, kind):
    """At attach time every type leaves the model as it was; after training, switching the
    adapters off (the reference) gives the base's logits, and base_adapter_weights restore it."""
    from mlx_lm import load

    base, _ = load(str(toy_model_dir))
    pairs = scored(4)
    want = logits(base, pairs)
    model = fresh(toy_model_dir, kind)
    assert mx.abs(logits(model, pairs) - want).max().item() < 1e-4
    config = TrainingConfig(learning_rate=lr(kind), compile=False)
    fit(model, make_loss(config), stream(pairs), 3, config)
    assert mx.abs(logits(model, pairs) - want).max().item() > 1e-3  # it trained
    with adapters_disabled(model):
        assert mx.abs(logits(model, pairs) - want).max().item() < 1e-4
    model.load_weights(list(base_adapter_weights(model).items()), strict=False)
    assert mx.abs(logits(model, pairs) - want).max().item() < 1e-4


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_each_type_trains_its_own_weights_from_log_2(toy_model_dir, kind):
    """At step 0 the adapters are the base, so with references scored by the base the loss is
    log 2 for every type; then it falls."""
    from mipo_mlx.engine.scoring import score_pairs

    model = fresh(toy_model_dir, kind)
    names = set(adapter_weights(model))
    assert any(n.endswith(".m") for n in names) == (kind == "dora")
    pairs = made_up_pairs(8, 200)
    for pair, (c, r) in zip(pairs, score_pairs(model, pairs, 0, 8)):
        pair.reference_logps = {"chosen": c, "rejected": r}
    config = TrainingConfig(learning_rate=lr(kind), compile=False)
    rows = []
    fit(model, make_loss(config), stream(pairs), 4, config, hooks(on_step=rows.append))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_each_type_resumes_to_the_uninterrupted_result(toy_model_dir, tmp_path, kind):
    config = TrainingConfig(learning_rate=lr(kind), compile=False, checkpoint_every=2)
    pairs = scored(8)
    whole = fresh(toy_model_dir, kind)
    fit(whole, make_loss(config), stream(pairs), 5, config)
    first = fresh(toy_model_dir, kind)
    keep = hooks(on_checkpoint=lambda s: s.step == 2 and train_state.save(tmp_path, s))
    fit(first, make_loss(config), stream(pairs), 2, config, keep)
    state = train_state.load(tmp_path)
    assert state.step == 2
    again = fresh(toy_model_dir, kind)
    batches = stream(pairs)
    for _ in range(state.batches_done):
        next(batches)
    fit(again, make_loss(config), batches, 5, config, resume=state)
    want, got = adapter_weights(whole), adapter_weights(again)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(np.array(got[key]), np.array(want[key]), atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def runs(toy_model_dir, tmp_path_factory):
    """A short finished run of each type, from the command line."""
    root = tmp_path_factory.mktemp("types")
    prompts = write_prompts(root / "prompts.jsonl", n=12)
    found = {}
    for kind in FINE_TUNE_TYPES:
        out = root / kind
        args = run_args(toy_model_dir, prompts, out, *TRAIN, "--lora.type", kind)
        args += ["--training.learning_rate", str(lr(kind))]
        done = subprocess.run(
            [sys.executable, "-m", "mipo_mlx.train", *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        found[kind] = out
    return found


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_mlx_lm_loads_the_adapters_as_its_own(runs, toy_model_dir, kind):
    """mlx_lm.load(base, adapter_path=run) reads the type from adapter_config.json and gives
    the logits our own loader gives."""
    from mlx_lm import load

    run = runs[kind]
    assert json.loads((run / "adapter_config.json").read_text())["fine_tune_type"] == kind
    theirs, _ = load(str(toy_model_dir), adapter_path=str(run))
    ours, _ = load(str(toy_model_dir))
    load_adapters(ours, run)
    pairs = read_pairs(run / "pairs.jsonl")[:4]
    assert mx.abs(logits(theirs, pairs) - logits(ours, pairs)).max().item() < 1e-5


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_each_type_fuses_into_weights_that_match(runs, toy_model_dir, tmp_path, kind, capsys):
    from mlx_lm import load

    run = runs[kind]
    fused_dir = tmp_path / "fused"
    assert export.main(["--adapters", str(run), "--output", str(fused_dir)]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    fused, _ = load(str(fused_dir))
    base, _ = load(str(toy_model_dir))
    load_adapters(base, run)
    pairs = read_pairs(run / "pairs.jsonl")[:4]
    assert mx.abs(logits(fused, pairs) - logits(base, pairs)).max().item() < 1e-3


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_each_type_exports_to_gguf(runs, tmp_path, kind, capsys):
    """The fused weights go to GGUF as they are (f32: exactly)."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (dev extra)")
    from mlx_lm import load

    out = tmp_path / "fused"
    assert export.main(["--adapters", str(runs[kind]), "--output", str(out), "--gguf", "f32"]) == 0
    capsys.readouterr()
    model, _ = load(str(out))
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    v = np.array(model.model.layers[1].self_attn.v_proj.weight)
    assert np.array_equal(stored["blk.1.attn_v.weight"], v)


@pytest.mark.integration  # two ranks under mlx.launch, each a process of its own
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not on PATH")
@pytest.mark.parametrize("kind", ["dora", "full"])  # lora: tests/test_distributed.py
def test_two_ranks_train_the_weights_of_one(toy_model_dir, tmp_path, kind):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=16)
    extra = [*TRAIN, "--lora.type", kind, "--training.learning_rate", str(lr(kind))]
    extra += ["--training.batch_size"]
    outs = []
    for n, batch in ((1, "4"), (2, "2")):
        out = tmp_path / f"ranks-{n}"
        cmd = [sys.executable, "-m", "mipo_mlx.train", *run_args(toy_model_dir, prompts, out)]
        cmd += [*extra, batch]
        if n > 1:
            cmd = [shutil.which("mlx.launch"), "-n", "2", "--backend", "ring", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        outs.append({k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()})
    one, two = outs
    assert one.keys() == two.keys() and any(k.endswith(".m") for k in one) == (kind == "dora")
    scale = max(np.abs(v).max() for v in one.values())
    assert max(np.abs(one[k] - two[k]).max() for k in one) <= 1e-3 * scale
    assert Path(tmp_path / "ranks-2" / "adapter_config.json").is_file()


def test_the_memory_estimates_count_doras_dense_weights(toy_model_dir):
    """DoRA makes each adapted weight dense in fp32 for its row norms, and keeps it for the
    backward: the run's estimate and the planner both add it (and the magnitudes)."""
    from mipo_mlx.engine.memory import PAPER_MODELS, Workload, dora_dense_bytes, estimate, plan

    pairs = scored(4)
    config = TrainingConfig()
    lora, dora = fresh(toy_model_dir, "lora"), fresh(toy_model_dir, "dora")
    q = dora.layers[0].self_attn.q_proj.linear.weight
    assert dora_dense_bytes(lora) == 0 and dora_dense_bytes(dora) >= 4 * q.size
    gap = estimate(dora, pairs, config).total - estimate(lora, pairs, config).total
    assert gap >= dora_dense_bytes(dora)
    for shape in PAPER_MODELS:
        work = [Workload(300, 256, 4, False, 32, 8, kind) for kind in ("lora", "dora")]
        linears = shape.layers * sum(i * o for i, o in shape.linears())
        assert plan(shape, work[1])["training"] - plan(shape, work[0])["training"] >= 4 * linears


def test_full_fine_tuning_of_a_quantized_base_stops_before_any_stage(
    toy_model_dir, tmp_path, capfd
):
    """The run stops in one line, exit status 2, before the model answers anything."""
    from .in_process import run_main

    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "run"
    args = run_args(toy_model_dir, prompts, out, *TRAIN, "--lora.type", "full")
    args += ["--model.quantize_bits", "4", "--model.quantize_group_size", "32"]
    done = run_main("train", [*args, "--model.quantize_on_cpu", "true"], capfd)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lora.type=full" in lines[0] and "quantized" in lines[0]
    assert "Traceback" not in done.stderr and not (out / "pairs.jsonl").exists()


def test_lora_keys_with_full_fine_tuning_are_refused_in_one_line():
    from mipo_mlx.core.config import Config
    from mipo_mlx.core.errors import UserError
    from mipo_mlx.core.settings import validate

    config = Config()
    config.model.path, config.data.prompts = "m", "p.jsonl"
    config.lora.type, config.lora.keys = "full", ["self_attn.q_proj"]
    with pytest.raises(UserError, match="lora.keys") as err:
        validate(config)
    assert "\n" not in str(err.value)


def test_dora_on_a_quantized_base_starts_at_it_and_fuses_to_what_it_trained(toy_model_dir):
    """mlx-lm's DoRA takes quantized linears (its magnitudes from the dequantized weights): the
    run starts at the quantized base and the de-quantized fuse gives the trained logits."""
    from mlx_lm import load

    from mipo_mlx.engine.model import quantize
    from mipo_mlx.publish.fuse import fuse

    model, _, config = load(str(toy_model_dir), return_config=True)
    quantize(model, config, 4, 32)
    pairs = scored(4)
    want = logits(model, pairs)
    attach_lora(model, LoraConfig(type="dora", rank=4), seed=0)
    assert mx.abs(logits(model, pairs) - want).max().item() < 1e-4
    train = TrainingConfig(learning_rate=5e-3, compile=False)
    fit(model, make_loss(train), stream(pairs), 3, train)
    trained = logits(model, pairs)
    assert mx.abs(trained - want).max().item() > 1e-3
    fuse(model, dequantize=True)
    assert mx.abs(logits(model, pairs) - trained).max().item() < 1e-3


@pytest.mark.parametrize("kind", FINE_TUNE_TYPES)
def test_the_guard_gives_back_the_round_it_kept_and_the_base(toy_model_dir, kind):
    """The guard's keeper restores the weights it was offered after later training, and the
    base; a full fine-tune's kept weights wait on disk, not as a second copy in memory."""
    from mipo_mlx.stages.guard import Keeper

    model, pairs = fresh(toy_model_dir, kind), scored(4)
    base = logits(model, pairs)
    config = TrainingConfig(learning_rate=lr(kind), compile=False)
    fit(model, make_loss(config), stream(pairs), 2, config)
    kept, keeper = logits(model, pairs), Keeper()
    keeper.offer(model, is_best=True)
    assert isinstance(keeper.best, Path) == (kind == "full")
    fit(model, make_loss(config), stream(pairs), 2, config)
    assert mx.abs(logits(model, pairs) - kept).max().item() > 1e-4
    keeper.restore(model)
    assert mx.abs(logits(model, pairs) - kept).max().item() < 1e-5
    Keeper().restore(model)  # nothing offered: the base
    assert mx.abs(logits(model, pairs) - base).max().item() < 1e-4
