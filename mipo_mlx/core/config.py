"""Typed settings: the one source of truth for YAML files, the CLI and defaults.

Every setting is a dataclass field with its help text and limits in the field's
metadata. YAML keys and `--section.key` CLI options are derived from these
classes, so there is nowhere else for a default to drift. `settings.py` checks and
reads them: types and limits, YAML files, the rules across keys, and precedence.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .loss_settings import HONOURS


@dataclass(frozen=True)
class NegativeNeeds:
    """What a negative strategy needs of the settings, checked before any model loads."""

    context: bool = False  # a prompt template that shows the user's context
    samples: int = 1  # at least this many pairs.samples


# The negative strategies (stages/negatives.py registers a class for each) and their needs
NEGATIVE_STRATEGIES = {
    "random": NegativeNeeds(),
    "incomplete": NegativeNeeds(),
    "no_context": NegativeNeeds(context=True),
    "random_context": NegativeNeeds(context=True),
    "mixed": NegativeNeeds(context=True),
    "majority_vote": NegativeNeeds(samples=3),
}
# Row formats a prompt source can be in: the project's own JSONL, or a public dataset's.
DATA_FORMATS = ("prompts", "gsm8k", "svamp", "arc", "mmlu", "prism", "community_alignment")
# The names data.template takes: the paper's prompt templates (templates.PAPER_TEMPLATES holds them)
TEMPLATE_NAMES = (None, "gsm8k_8shot", "arc_zero_shot", "prism")
# lora.type: what trains (engine/lora.py), named as mlx-lm's fine_tune_type
FINE_TUNE_TYPES = ("lora", "dora", "full")
# The preference losses (engine/losses.py registers each; loss_settings.HONOURS names them)
LOSSES = tuple(HONOURS)
# Where a run's metrics also go (trackers.py): nowhere but the run folder, or a tracker.
REPORT_TO = ("none", "tensorboard", "wandb")
# The optimizers (engine/trainer.py builds the mlx.optimizers class of each name, as mlx-lm's
# tuner does) and the keyword arguments training.optimizer_config may give each: its kind of
# value ("bool", "int", "float", "float or null", "2 floats") and the least and most it may be
# (None: no limit). settings.py checks them without mlx; tests/test_optimizers.py holds these
# names to the classes' signatures. learning_rate is none of them: the schedule sets it.
OPTIMIZERS: dict[str, dict[str, tuple[str, float | None, float | None]]] = {
    "adam": {
        "betas": ("2 floats", 0, 0.99999),
        "eps": ("float", 0, None),
        "bias_correction": ("bool", None, None),
    },
    "adamw": {
        "betas": ("2 floats", 0, 0.99999),
        "eps": ("float", 0, None),
        "weight_decay": ("float", 0, None),
        "bias_correction": ("bool", None, None),
    },
    "muon": {
        "momentum": ("float", 0, 0.99999),
        "weight_decay": ("float", 0, None),
        "nesterov": ("bool", None, None),
        "ns_steps": ("int", 1, None),
    },
    "sgd": {
        "momentum": ("float", 0, None),
        "weight_decay": ("float", 0, None),
        "dampening": ("float", 0, 1),
        "nesterov": ("bool", None, None),
    },
    "adafactor": {
        "eps": ("2 floats", 0, None),
        "clip_threshold": ("float", 0, None),
        "decay_rate": ("float", None, 0),
        "beta_1": ("float or null", 0, 0.99999),
        "weight_decay": ("float", 0, None),
        "scale_parameter": ("bool", None, None),
        "relative_step": ("bool", None, None),
        "warmup_init": ("bool", None, None),
    },
}


# The largest whole number a count may be (MLX takes shapes and sizes as 32-bit ints), and
# the largest seed (numpy's legacy seeding and every seed the code derives from one fit).
INT_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
# training.memory_limit_gb in bytes must fit the size_t mx.set_memory_limit takes.
MEMORY_MAX_GB = 1e6


def setting(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field with help text and limits: choices, min, max (an int has INT_MAX
    unless it says), gt, refused ((value, why) pairs: values that would not mean what they
    say), template (the {fields} a template must use, and nothing else)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **limits})
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class ModelConfig:
    path: str = setting("", "Hugging Face repo id or local folder of an mlx-lm model.")
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of the model.")
    quantize_bits: int | None = setting(
        None,
        "Quantize a full-precision base on load (QLoRA); null keeps it as it is.",
        choices=(None, 4, 8),
    )
    quantize_group_size: int = setting(
        64, "Group size for quantize-on-load.", choices=(32, 64, 128)
    )
    quantize_on_cpu: bool = setting(
        False,
        "Also quantize on the CPU backend, where MLX's quantized matmul is ~40x slower "
        "than float32.",
    )
    trust_remote_code: bool = setting(
        False, "Allow the tokenizer to run code shipped with the model."
    )


@dataclass
class LoraConfig:
    type: str = setting(
        "lora",
        "Fine-tuning type, as mlx-lm names it: lora (low-rank adapters), dora (LoRA's "
        "direction and a learned magnitude for each output, Liu et al. 2024), or full (the "
        "last lora.num_layers blocks' own weights, the paper's setting; a full-precision base).",
        choices=FINE_TUNE_TYPES,
    )
    rank: int = setting(8, "LoRA rank.", min=1)
    scale: float = setting(20.0, "LoRA scale (mlx-lm's `scale`, not `alpha`).", gt=0)
    dropout: float = setting(0.0, "Dropout on the LoRA input.", min=0, max=0.99)
    num_layers: int = setting(
        -1,
        "Adapt the last N transformer blocks; -1 adapts all.",
        min=-1,
        refused=((0, "adapts no block; use -1 for all of them, or N >= 1"),),
    )
    keys: list[str] | None = setting(
        None,
        "Module paths inside a block to adapt, e.g. [self_attn.q_proj]; null = all linears.",
        refused=(([], "adapts no module; use null for every linear, or name the modules"),),
    )


@dataclass
class DataConfig:
    prompts: str = setting(
        "",
        "Training prompts: a JSONL file ({prompt}, {messages} or {prompt, context}), "
        "or with data.format a public dataset file, folder or Hub dataset id.",
    )
    format: str = setting(
        "prompts",
        "Row format of data.prompts: this project's JSONL, or a public dataset's "
        "(labels are never read for training).",
        choices=DATA_FORMATS,
    )
    split: str | None = setting(
        None, "Keep only files whose path contains this (e.g. train, main/train)."
    )
    skip: int = setting(0, "Leave out the first N rows (e.g. those an evaluation uses).", min=0)
    subset: int | None = setting(
        None, "Draw N rows at random (seeded by data.subset_seed) before data.limit.", min=2
    )
    subset_seed: int = setting(42, "Seed of the data.subset draw.", min=0, max=SEED_MAX)
    template: str | None = setting(
        None,
        "A paper prompt template by name; it replaces data.prompt_template and "
        "data.context_template.",
        choices=TEMPLATE_NAMES,
    )
    max_prompt_tokens: int = setting(1024, "Longest rendered prompt, in tokens.", min=8)
    long_prompts: str = setting(
        "skip",
        "What to do with a longer prompt: skip it (reported), keep its end, or stop.",
        choices=("skip", "truncate", "error"),
    )
    prompt_template: str = setting(
        "{prompt}",
        "Final user turn for a plain prompt; {prompt} is the row's text.",
        template=("prompt",),
    )
    context_template: str = setting(
        "{prompt}\n\nPlease respect the following requirements made by the user: {context}",
        "Final user turn for a row with a context; {prompt} and {context} are filled in.",
        template=("prompt", "context"),
    )
    system_prompt: str | None = setting(
        None, "System message put before every prompt (paper: none)."
    )
    enable_thinking: bool = setting(
        False, "Passed to the chat template for thinking-capable models."
    )
    valid_fraction: float = setting(
        0.05, "Share of prompts held out as validation pairs.", min=0, max=0.5
    )
    limit: int | None = setting(None, "Use only the first N prompts (quick trial runs).", min=2)


@dataclass
class GenerationConfig:
    temperature: float = setting(
        0.1, "Sampling temperature (paper: 0.1; 1.0 for multiple choice).", min=0
    )
    top_p: float = setting(0.9, "Nucleus sampling mass (paper: 0.9).", gt=0, max=1)
    max_tokens: int = setting(512, "Longest response, in tokens.", min=1)
    batch_size: int = setting(16, "Prompts decoded together.", min=1)
    truncated: str = setting(
        "drop",
        "Responses that hit max_tokens: drop them, or keep them as generated (no EOS).",
        choices=("drop", "keep"),
    )
    seed: int = setting(
        42, "Sampling seed; each prompt gets its own stream from it.", min=0, max=SEED_MAX
    )


@dataclass
class PairsConfig:
    negatives: str = setting(
        "random", "How rejected responses are made.", choices=tuple(NEGATIVE_STRATEGIES)
    )
    seed: int = setting(42, "Seed for the derangement and sentence dropping.", min=0, max=SEED_MAX)
    samples: int = setting(
        1,
        "Answers sampled per prompt. Above 1, the chosen answer is the one the current model "
        "ranks highest by its own PMI (best-of-k: log p(y|x,c) - log p(y|x) for a prompt with a "
        "context, log p(y|x) - log p(y|x') otherwise); majority_vote votes among them.",
        min=1,
    )
    min_vote_margin: int = setting(
        1,
        "majority_vote: the chosen answer's result needs at least this many more votes than "
        "the rejected answer's; prompts with less agreement get no pair.",
        min=1,
    )
    drop_identical: bool = setting(
        False,
        "Drop pairs whose chosen and rejected answers are the same text: they carry no DPO "
        "gradient but count in each batch's mean.",
    )


@dataclass
class TrainingConfig:
    loss: str = setting("sigmoid", "Preference loss.", choices=LOSSES)
    beta: float = setting(0.1, "DPO beta.", gt=0)
    label_smoothing: float = setting(
        0.0, "Label smoothing for sigmoid/robust losses.", min=0, max=0.49
    )
    nll_weight: float = setting(
        0.0,
        "Weight of an NLL term on the chosen answer, added to the preference loss: "
        "alpha * -log pi(y+|x) / |y+| (iterative RPO); it keeps the chosen answers likely.",
        min=0,
    )
    learning_rate: float = setting(1e-5, "Peak learning rate.", gt=0)
    warmup_fraction: float = setting(0.03, "Share of steps with linear warmup.", min=0, max=1)
    min_lr_ratio: float = setting(0.1, "Cosine decays to this fraction of the peak.", min=0, max=1)
    optimizer: str = setting(
        "adamw",
        "Optimizer: the mlx.optimizers class of that name, as mlx-lm's tuner offers them; its "
        "learning rate is the warmup and cosine schedule above.",
        choices=tuple(OPTIMIZERS),
    )
    optimizer_config: dict[str, Any] = setting(
        {},
        "Keyword arguments of the training.optimizer class, as mlx-lm names them (e.g. "
        "{momentum: 0.9} for sgd; JSON on the command line), but learning_rate. A key given "
        "here replaces the value of training.adam_beta1 and adam_beta2 (betas) or "
        "training.weight_decay (weight_decay); giving both, that training key off its "
        "default, is refused. adafactor defaults to relative_step: false and "
        "scale_parameter: false, so that the schedule sets its step.",
    )
    weight_decay: float = setting(
        0.0, "Weight decay of adamw, muon, sgd and adafactor (adam has none).", min=0
    )
    adam_beta1: float = setting(0.9, "Adam beta1 (adam and adamw).", min=0, max=0.9999)
    adam_beta2: float = setting(0.95, "Adam beta2 (adam and adamw).", min=0, max=0.99999)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0 turns it off.", min=0)
    batch_size: int = setting(4, "Pairs per optimizer step (before accumulation).", min=1)
    grad_accumulation: int = setting(1, "Micro-batches summed into one optimizer step.", min=1)
    epochs: int = setting(1, "Passes over the training pairs (paper: 1).", min=1)
    iters: int | None = setting(None, "Optimizer steps; null = epochs x pairs / batch.", min=1)
    rounds: int = setting(
        1,
        "Rounds of generate -> pairs -> train (the paper runs 1; more is an extension): round k "
        "answers with round k-1's adapters, and that model is round k's reference.",
        min=1,
    )
    fresh_prompts: bool = setting(
        False,
        "Each round answers prompts no earlier round trained on: round k takes the k-th "
        "block of data.limit prompts of data.prompts.",
    )
    shared_prompt: str = setting(
        "auto",
        "Run each prompt once for its chosen and rejected responses (same "
        "log-probs, less work); auto checks the model supports it.",
        choices=("auto", "on", "off"),
    )
    length_buckets: int = setting(
        16,
        "Batches drawn together and sorted by length, so a batch pads little; "
        "1 = plain random batches.",
        min=1,
    )
    grad_checkpoint: bool = setting(
        False, "Recompute block activations in backward to save memory."
    )
    compile: bool = setting(True, "Compile the training step with mx.compile.")
    valid_every: int = setting(
        50, "Validate on held-out pairs every N steps; 0 = only at the end.", min=0
    )
    save_every: int = setting(100, "Save adapters every N steps; 0 = only at the end.", min=0)
    score_batch_size: int = setting(8, "Pairs per forward when scoring the reference.", min=1)
    checkpoint_every: int = setting(
        25, "Write a resumable checkpoint every N steps (and at stops).", min=1
    )
    on_nan: str = setting(
        "stop",
        "A non-finite loss or gradient: stop (keeping the last checkpoint), "
        "or skip the step (undone).",
        choices=("stop", "skip"),
    )
    max_skipped_steps: int = setting(
        10, "With on_nan=skip, stop after this many skipped steps.", min=0
    )
    memory_limit_gb: float | None = setting(
        None, "Cap MLX's memory use (GB); null = MLX's default.", gt=0, max=MEMORY_MAX_GB
    )
    seed: int = setting(42, "Seed for data order, LoRA init and dropout.", min=0, max=SEED_MAX)
    report_to: str = setting(
        "none",
        "Also send the metrics, settings, evaluation table and plots to a tracker: "
        "tensorboard (event files in the output folder's tensorboard/) or wandb "
        "(Weights & Biases).",
        choices=REPORT_TO,
    )
    run_name: str | None = setting(None, "The run's name in W&B; null = the output folder's name.")


@dataclass
class EvaluationConfig:
    prompts: str | None = setting(
        None,
        "Held-out prompts (JSONL with 'answer' labels, or a public dataset as "
        "evaluation.format says); null skips evaluation.",
    )
    format: str = setting(
        "prompts", "Row format of evaluation.prompts (as data.format).", choices=DATA_FORMATS
    )
    split: str | None = setting(None, "Keep only files whose path contains this (e.g. test).")
    subset: int | None = setting(
        None,
        "Draw N rows at random (seeded by evaluation.subset_seed) before "
        "evaluation.limit (paper: GSM8K 200, ARC 500, seed 42).",
        min=2,
    )
    subset_seed: int = setting(42, "Seed of the evaluation.subset draw.", min=0, max=SEED_MAX)
    limit: int | None = setting(200, "Evaluate on the first N held-out prompts; null = all.", min=2)
    temperature: float = setting(0.1, "Sampling temperature for evaluation answers.", min=0)
    top_p: float = setting(0.9, "Nucleus sampling mass for evaluation answers.", gt=0, max=1)
    max_tokens: int = setting(256, "Longest evaluation answer, in tokens.", min=1)
    pmi_negatives: int = setting(4, "Other prompts x' per answer in the PMI estimate.", min=1)
    best_of: int = setting(
        1,
        "Answers sampled per prompt; above 1 the one the base model ranks highest by its PMI "
        "is kept (best-of-k reranking, at k times the inference cost).",
        min=1,
    )
    seed: int = setting(
        1234,
        "Sampling seed for evaluation (the same for base and adapters).",
        min=0,
        max=SEED_MAX,
    )
    judge: str | None = setting(
        None,
        "Judge model (Hub id or folder of any mlx-lm chat model) scoring answers "
        "1-5 per stated preference, for prompts with a context; null = no judge.",
    )
    judge_max_tokens: int = setting(128, "Longest judge answer, in tokens (greedy).", min=8)
    judge_batch_size: int = setting(16, "Judge prompts decoded together.", min=1)
    plots: bool = setting(True, "Write PNG plots (needs matplotlib: pip install 'mipo_mlx[plot]').")


@dataclass
class GuardConfig:
    prompts: str | None = setting(
        None,
        "Valid prompts (as evaluation.format) on which the base and every round are scored; "
        "the run keeps the best of them, the base included. null = no guard.",
    )
    limit: int | None = setting(200, "Score on the first N valid prompts; null = all.", min=2)
    keep: str = setting(
        "best",
        "Which adapters the run ends with: the best-scoring round on the valid prompts (zero "
        "adapters, i.e. the base, when no round beats it), or the last round (guard off).",
        choices=("best", "last"),
    )
    score: str = setting(
        "auto",
        "What ranks the rounds: the task's own measure where valid rows carry labels "
        "(accuracy, compliance), else the label-free objective (PMI minus KL to the base).",
        choices=("auto", "labels", "label_free"),
    )


@dataclass
class OutputConfig:
    dir: str = setting("mipo_output", "Folder for adapters, pairs, config and metrics.")
    overwrite: bool = setting(False, "Replace a folder that holds an earlier run.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Short CLI spellings of the settings every run needs.
SHORTCUTS = {
    "model": "model.path",
    "prompts": "data.prompts",
    "output": "output.dir",
    "iters": "training.iters",
}


def sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def settings_of(section: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Map each field name of a section to (resolved type, field)."""
    hints = typing.get_type_hints(section)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in sections().items() for k in settings_of(cls)]


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _range_text(meta: Any) -> str:
    """The limits of a setting, as the settings table states them."""
    low = (
        f"above {meta['gt']}"
        if "gt" in meta
        else f"at least {meta['min']}"
        if "min" in meta
        else ""
    )
    high = f"at most {meta['max']}" if "max" in meta else ""
    refused = [f"not {json.dumps(value)}" for value, _ in meta.get("refused", ())]
    said = ", ".join(part for part in (low, high, *refused) if part)
    return f" Range: {said}." if said else ""


def reference_markdown() -> str:
    """The settings table for the README (a test keeps the two in step)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = Config()
    for section_name, section in sections().items():
        for name, (_, f) in settings_of(section).items():
            value = getattr(getattr(defaults, section_name), name)
            shown = (
                "null"
                if value is None
                else json.dumps(value)
                if isinstance(value, str)
                else str(value)
            )
            meaning = f.metadata["help"] + _range_text(f.metadata)
            if "choices" in f.metadata:
                meaning += (
                    " One of: "
                    + ", ".join("null" if c is None else str(c) for c in f.metadata["choices"])
                    + "."
                )
            lines.append(f"| `{section_name}.{name}` | `{shown}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
