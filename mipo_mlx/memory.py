"""A peak-memory estimate printed before training, and the machine's recommended working set."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlx.utils import tree_flatten

from .config import TrainingConfig
from .score import PAD_MULTIPLE


@dataclass
class Estimate:
    model: int  # bytes of all weights (quantized ones at their packed size)
    adapters: int  # adapter weights, their gradients and Adam's two moments
    activations: int  # what the backward pass keeps for the longest batch
    total: int


def estimate(model, pairs, config: TrainingConfig) -> Estimate:
    """Upper-bound style estimate; formulas per row of T tokens (fp32 activations):
    per block ~ (12 h + 3 i) T + heads T^2 values kept (one block when checkpointing),
    plus logits, log-softmax and their gradient: 3 V T values."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", 1024)
    inter = getattr(args, "intermediate_size", 4 * hidden)
    heads = getattr(args, "num_attention_heads", 16)
    vocab = getattr(args, "vocab_size", 32000)
    layers = len(getattr(model, "layers", [])) or 1
    longest = max((p.length for p in pairs), default=1)
    t = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    rows = 2 * config.batch_size
    kept_blocks = 1 if config.grad_checkpoint else layers
    per_row = kept_blocks * ((12 * hidden + 3 * inter) * t + heads * t * t) + layers * hidden * t + 3 * vocab * t
    activations = 4 * rows * per_row
    adapters = 4 * 4 * trainable
    return Estimate(weights, adapters, activations, weights + adapters + activations)


def working_set_bytes() -> int | None:
    """Metal's recommended working set; elsewhere the physical memory. Never a Metal-only key lookup."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    recommended = info.get("max_recommended_working_set_size")
    if recommended:
        return int(recommended)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
