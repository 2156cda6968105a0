"""The peak-memory estimate printed before training."""

import pytest

from mipo_mlx.core.config import LoraConfig, ModelConfig, TrainingConfig
from mipo_mlx.engine import model as mdl
from mipo_mlx.engine.lora import attach_lora
from mipo_mlx.engine.memory import estimate, working_set_bytes

from .builders import made_up_pairs


def test_estimate_parts_and_checkpointing(toy_model_dir):
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    trainable = attach_lora(model, LoraConfig(rank=4), seed=0)
    pairs = made_up_pairs(4)
    plain = estimate(model, pairs, TrainingConfig(batch_size=4))
    assert plain.adapters == 16 * trainable  # weights, gradients, two Adam moments, fp32
    assert plain.total == plain.model + plain.adapters + plain.activations
    checkpointed = estimate(model, pairs, TrainingConfig(batch_size=4, grad_checkpoint=True))
    assert checkpointed.activations < plain.activations
    assert estimate(model, pairs, TrainingConfig(batch_size=8)).activations == 2 * plain.activations


def test_working_set_is_known_here():
    assert working_set_bytes() > 1e9  # physical memory on the CPU backend (no Metal-only key read)


def test_paper_model_shapes_give_their_published_sizes():
    """Parameter counts from the config.json values against the model cards' totals."""
    from mipo_mlx.engine.memory import PAPER_MODELS

    published = {
        "Llama-3.2-1B-Instruct": 1.24e9,
        "Qwen2.5-1.5B-Instruct": 1.54e9,
        "Qwen2.5-3B-Instruct": 3.09e9,
        "Llama-3.2-3B-Instruct": 3.21e9,
        "Qwen2.5-7B-Instruct": 7.62e9,
    }
    for shape in PAPER_MODELS:
        assert shape.params == pytest.approx(published[shape.name], rel=0.01), shape.name


def test_plan_by_hand_and_its_levers():
    """A two-layer shape worked by hand; checkpointing and a smaller batch cost less."""
    from mipo_mlx.engine.memory import Shape, Workload, plan

    shape = Shape(
        "tiny", hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10, tied=True
    )
    # block linears: q 64, k 32, v 32, o 64, gate 128, up 128, down 128 = 576; norms 16 -> 592
    assert shape.params == 2 * 592 + 10 * 8 + 8
    work = Workload(
        prompt_tokens=3,
        response_tokens=2,
        batch_size=1,
        grad_checkpoint=False,
        generation_batch=4,
        lora_rank=1,
    )
    got = plan(shape, work, bits=4, group_size=64, compute_bytes=2)
    assert got["weights"] == shape.params * 4.5 / 8
    lora = 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)  # rank 1: in + out per linear, 2 layers
    per_row = 2 * ((12 * 8 + 3 * 16) * 5 + 2 * 25) + 2 * 8 * 5 + 3 * 10 * 2
    assert got["training"] == 16 * lora + 2 * 2 * per_row
    assert got["generation"] == 2 * 2 * 1 * 4 * 5 * 4 * 2
    assert got["total"] == got["weights"] + max(got["training"], got["generation"])
    lighter = plan(shape, Workload(3, 2, 1, True, 4, 1))
    assert lighter["training"] < got["training"]
    assert plan(shape, Workload(3, 2, 2, False, 4, 1))["training"] > got["training"]
