"""The peak-memory estimate printed before training."""

from mipo_mlx import model as mdl
from mipo_mlx.config import LoraConfig, ModelConfig, TrainingConfig
from mipo_mlx.memory import estimate, working_set_bytes

from .builders import random_pairs


def test_estimate_parts_and_checkpointing(toy_model_dir):
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    trainable = mdl.attach_lora(model, LoraConfig(rank=4), seed=0)
    pairs = random_pairs(4)
    plain = estimate(model, pairs, TrainingConfig(batch_size=4))
    assert plain.adapters == 16 * trainable  # weights, gradients, two Adam moments, fp32
    assert plain.total == plain.model + plain.adapters + plain.activations
    checkpointed = estimate(model, pairs, TrainingConfig(batch_size=4, grad_checkpoint=True))
    assert checkpointed.activations < plain.activations
    assert estimate(model, pairs, TrainingConfig(batch_size=8)).activations == 2 * plain.activations


def test_working_set_is_known_here():
    assert working_set_bytes() > 1e9  # physical memory on the CPU backend (no Metal-only key read)
