"""A peak-memory estimate printed before training, and the machine's recommended working set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..core.config import TrainingConfig
from ..core.settings import resolve
from .batching import PAD_MULTIPLE
from .lora import full_base, lora_modules


@dataclass
class Estimate:
    model: int  # bytes of all weights (quantized ones at their packed size)
    adapters: int  # adapter weights, their gradients and Adam's two moments
    activations: int  # what the backward pass keeps for the longest batch
    total: int


def activation_values(
    hidden: int,
    inter: int,
    heads: int,
    vocab: int,
    layers: int,
    tokens: int,
    scored: int,
    rows: int,
    grad_checkpoint: bool,
) -> int:
    """Values the backward pass keeps for `rows` rows of `tokens` tokens, `scored` of them
    response positions (the only ones through the LM head): per block ~ (12 h + 3 i) T +
    heads T^2 (one block when checkpointing, plus each block's input), and logits,
    log-softmax and their gradient, 3 V S."""
    kept_blocks = 1 if grad_checkpoint else layers
    per_row = (
        kept_blocks * ((12 * hidden + 3 * inter) * tokens + heads * tokens * tokens)
        + layers * hidden * tokens
        + 3 * vocab * scored
    )
    return rows * per_row


def estimate(model, pairs, config: TrainingConfig) -> Estimate:
    """Upper-bound style estimate for the longest batch (fp32 activations)."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", 1024)
    inter = getattr(args, "intermediate_size", 4 * hidden)
    heads = getattr(args, "num_attention_heads", 16)
    vocab = getattr(args, "vocab_size", 32000)
    layers = len(getattr(model, "layers", [])) or 1
    longest = max((p.length for p in pairs), default=1)
    scored = max((max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=1)
    t = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    activations = 4 * activation_values(
        hidden,
        inter,
        heads,
        vocab,
        layers,
        t,
        scored,
        2 * config.batch_size,
        config.grad_checkpoint,
    )
    if full_base(model) is not None:  # the weights are counted: their gradients and 2 moments
        adapters = 3 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    else:  # fp32 adapters, their gradients and Adam's two moments
        adapters = 4 * 4 * trainable
    activations += dora_dense_bytes(model)
    return Estimate(weights, adapters, activations, weights + adapters + activations)


def dora_dense_bytes(model) -> int:
    """What DoRA layers add to a step: each forward makes its adapted weight W + s B^T A^T
    dense, in fp32, for the row norms, and the backward keeps it (mlx-lm's DoRALinear)."""
    return sum(
        4 * module.lora_a.shape[0] * module.lora_b.shape[1]
        for _, module in lora_modules(model)
        if "m" in module
    )


@dataclass(frozen=True)
class Shape:
    """A decoder's published configuration (config.json of its Hub release)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # input embedding reused as the LM head

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear of one block: q, k, v, o, gate, up, down."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [
            (h, h),
            (h, kv),
            (h, kv),
            (h, h),
            (h, self.intermediate),
            (h, self.intermediate),
            (self.intermediate, h),
        ]

    @property
    def params(self) -> int:
        block = sum(i * o for i, o in self.linears()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * block + embeddings + self.hidden


# The paper's models (Hub config.json values); biases of Qwen's q/k/v are left out (<0.1%).
PAPER_MODELS = (
    Shape("Llama-3.2-1B-Instruct", 2048, 8192, 16, 32, 8, 128256, True),
    Shape("Qwen2.5-1.5B-Instruct", 1536, 8960, 28, 12, 2, 151936, True),
    Shape("Qwen2.5-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, True),
    Shape("Llama-3.2-3B-Instruct", 3072, 8192, 28, 24, 8, 128256, True),
    Shape("Qwen2.5-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False),
)


@dataclass(frozen=True)
class Workload:
    """What a recipe asks of memory: longest prompt and response, batch and generation batch."""

    prompt_tokens: int
    response_tokens: int
    batch_size: int
    grad_checkpoint: bool
    generation_batch: int
    lora_rank: int = 8
    fine_tune_type: str = "lora"  # lora.type


def plan(
    shape: Shape, work: Workload, bits: int = 4, group_size: int = 64, compute_bytes: int = 2
) -> dict:
    """Estimated peak bytes of a run on `shape`: weights quantized to `bits` (plus a 16-bit
    scale and bias per group; full fine-tuning keeps them in `compute_bytes`), then the
    larger of training (adapters with gradients and Adam moments in fp32, or for full
    fine-tuning the blocks' gradients and moments; activations of the longest batch; for DoRA
    each adapted weight dense in fp32 as well) and generation (KV cache of a full generation
    batch, 16-bit)."""
    weights = shape.params * (bits + 32 / group_size) / 8
    trainable = shape.layers * sum(work.lora_rank * (i + o) for i, o in shape.linears())
    adapter_bytes = 16 * trainable  # fp32 adapters, gradients and Adam's two moments
    if work.fine_tune_type == "full":  # unquantized weights; the blocks' gradients and moments
        weights = shape.params * compute_bytes
        block = shape.layers * sum(i * o for i, o in shape.linears())
        adapter_bytes = 3 * compute_bytes * block
    dora_dense = 0
    if work.fine_tune_type == "dora":  # a magnitude per output, and each adapted weight dense
        trainable += shape.layers * sum(o for _, o in shape.linears())
        dora_dense = 4 * shape.layers * sum(i * o for i, o in shape.linears())
    tokens = work.prompt_tokens + work.response_tokens
    activations = compute_bytes * activation_values(
        shape.hidden,
        shape.intermediate,
        shape.heads,
        shape.vocab,
        shape.layers,
        tokens,
        work.response_tokens,
        2 * work.batch_size,
        work.grad_checkpoint,
    )
    kv_cache = (
        2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * work.generation_batch * 2
    )
    training = adapter_bytes + activations + dora_dense
    return {
        "weights": weights,
        "training": training,
        "generation": kv_cache,
        "total": weights + max(training, kv_cache),
    }


def working_set_bytes() -> int | None:
    """Metal's recommended working set; elsewhere the physical memory. Never a Metal-only key
    lookup."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    recommended = info.get("max_recommended_working_set_size")
    if recommended:
        return int(recommended)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# Longest rendered prompt assumed per paper template, in tokens (chat template included):
# the GSM8K 8-shot prefix is 439 words (~600 tokens) plus a question of up to ~200 tokens;
# an ARC question with its choices stays under ~250; a PRISM prompt with its requirements ~300.
PROMPT_TOKENS = {"gsm8k_8shot": 850, "arc_zero_shot": 250, "prism": 300}
RECIPES = (
    "gsm8k",
    "svamp",
    "arc-challenge",
    "arc-easy",
    "prism",
    "community-alignment",
    "paper-full-gsm8k",
)


def recipe_workload(config) -> Workload:
    t = config.training
    return Workload(
        PROMPT_TOKENS[config.data.template],
        config.generation.max_tokens,
        t.batch_size,
        t.grad_checkpoint,
        config.generation.batch_size,
        config.lora.rank,
        config.lora.type,
    )


def recipe_memory_markdown(configs: Path) -> str:
    """Estimated peak memory (GB) of each paper recipe on each of the paper's models, 4-bit."""
    header = (
        "| recipe | longest prompt + response (tokens) | "
        + " | ".join(m.name for m in PAPER_MODELS)
        + " |"
    )
    lines = [header, "|" + " --- |" * (len(PAPER_MODELS) + 2)]
    for name in RECIPES:
        work = recipe_workload(resolve(str(configs / f"{name}.yaml"), {}))
        cells = [f"{plan(m, work)['total'] / 1e9:.1f}" for m in PAPER_MODELS]
        lines.append(
            f"| `{name}` | {work.prompt_tokens} + {work.response_tokens} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(recipe_memory_markdown(Path(__file__).resolve().parents[2] / "configs"), end="")
