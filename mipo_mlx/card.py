"""The model card of an exported model: YAML front matter the Hub reads, and what was done."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import Config

TAGS = ["mipo", "dpo", "lora", "mlx"]


def front_matter(text: str) -> dict:
    """The YAML block between the leading '---' lines of a card, or {}."""
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def base_card(model_path: str) -> dict:
    """The base model's own front matter, from its folder or the local Hub cache."""
    local = Path(model_path) / "README.md"
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "README.md")
            local = Path(cached) if isinstance(cached, str) else local
        except Exception:  # noqa: BLE001 - no cache entry is the common case
            return {}
    return front_matter(local.read_text(encoding="utf-8")) if local.is_file() else {}


def model_card(run: Path, config: Config, model_config: dict, check, drift, quantize: int | None) -> str:
    base = base_card(config.model.path)
    meta = {"base_model": config.model.path, "library_name": "mlx", "pipeline_tag": "text-generation",
            "tags": TAGS + (["quantized"] if quantize else [])}
    if base.get("license"):
        meta["license"] = base["license"]
    pairs = sum(1 for line in (run / "pairs.jsonl").read_text().splitlines() if line.strip())
    t, lora = config.training, config.lora
    evaluation = (run / "eval.md").read_text() if (run / "eval.md").is_file() else "No evaluation was run.\n"
    weights = f"re-quantized to {quantize} bits" if quantize else f"de-quantized ({model_config.get('torch_dtype', 'float')})"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {config.model.path} + MIPO", "",
        "Fine-tuned with **MIPO** (Mutual Information Preference Optimization) using mipo_mlx: the base model",
        "answered each training prompt (chosen); the rejected answer was made without the prompt's information",
        "and scored under the right prompt; LoRA adapters were trained with DPO against the frozen base, then",
        f"fused into the weights ({weights}). No labels, no judge, no new data.", "",
        "## Training", "",
        f"- negatives: `{config.pairs.negatives}`; pairs: {pairs}",
        f"- loss: `{t.loss}`, beta {t.beta}, learning rate {t.learning_rate:g}, batch {t.batch_size} x "
        f"{t.grad_accumulation}, epochs {t.epochs}, steps {t.iters or 'one epoch'}",
        f"- LoRA: rank {lora.rank}, scale {lora.scale}, layers {lora.num_layers}, keys {lora.keys or 'all linears'}",
        f"- generation: temperature {config.generation.temperature}, top_p {config.generation.top_p}, "
        f"max tokens {config.generation.max_tokens}", "",
        "## Evaluation", "", evaluation,
        "## Export check", "", f"- fused vs base + adapters: {check.line()}",
    ]
    if drift is not None:
        lines.append(f"- after re-quantizing to {quantize} bits: {drift.line()}")
    lines += ["", "## Use", "", "```python", "from mlx_lm import load, generate", "",
              'model, tokenizer = load("<this repo or folder>")', "```", ""]
    return "\n".join(lines)
