"""The model card of an exported model: YAML front matter the Hub reads, and what was done."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..core import reading
from ..core.config import Config

TAGS = ["mipo", "dpo", "lora", "mlx"]


def front_matter(text: str) -> dict:
    """The metadata (YAML front matter) of a model card, as the Hub reads it; {} if it has none
    or it is unreadable."""
    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except ValueError:  # a front matter that is not a mapping
        return {}


def base_card(model_path: str) -> dict:
    """The base model's own card metadata, from its folder or the local Hub cache."""
    local = Path(model_path) / "README.md"
    if not local.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model_path, "README.md")
        except ValueError:  # not a repo id (a local path that has no card)
            return {}
        local = Path(cached) if isinstance(cached, str) else local
    return front_matter(reading.read_text(local, "model card")) if local.is_file() else {}


def gguf_section(gguf: dict) -> list[str]:
    """How to run the GGUF file, and whether llama.cpp was checked to match the fused model."""
    name, check = gguf["file"], gguf["check"]
    verified = (
        f"Checked in {check.line()}."
        if check is not None
        else "**Not verified**: llama-cpp-python was not installed when this file was written, "
        "so it was not loaded in llama.cpp and compared with the fused model."
    )
    return [
        "## GGUF (llama.cpp, Ollama, LM Studio)",
        "",
        f"`{name}`: {gguf['type']}, {gguf['bytes'] / 1e6:.1f} MB, tokenizer and chat template "
        "included. " + verified,
        "",
        "```sh",
        f"llama-cli -m {name} -cnv          # llama.cpp: chat with the model's template",
        f"llama-server -m {name}            # llama.cpp: an OpenAI-compatible server",
        "ollama create mipo -f Modelfile && ollama run mipo",
        "```",
        "",
        "The Modelfile names the file and the end-of-turn stop token; Ollama reads the chat "
        "template from the file (add a TEMPLATE line if it does not recognize it).",
        "",
    ]


def model_card(
    run: Path,
    config: Config,
    model_config: dict,
    check,
    drift,
    quantize: int | None,
    gguf: dict | None = None,
) -> str:
    meta = ModelCardData(
        base_model=config.model.path,
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=TAGS + (["quantized"] if quantize else []),
        license=base_card(config.model.path).get("license"),
    )
    pairs = sum(1 for _ in reading.json_values(run / "pairs.jsonl", "pairs"))
    t, lora = config.training, config.lora
    evaluation = (
        reading.read_text(run / "eval.md", "evaluation table")
        if (run / "eval.md").is_file()
        else "No evaluation was run.\n"
    )
    weights = (
        f"re-quantized to {quantize} bits"
        if quantize
        else f"de-quantized ({model_config.get('torch_dtype', 'float')})"
    )
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {config.model.path} + MIPO",
        "",
        "Fine-tuned with **MIPO** (Mutual Information Preference Optimization) using mipo_mlx: "
        "the base model",
        "answered each training prompt (chosen); the rejected answer was made without the "
        "prompt's information",
        "and scored under the right prompt; LoRA adapters were trained with DPO against the "
        "frozen base, then",
        f"fused into the weights ({weights}). No labels, no judge, no new data.",
        "",
        "## Training",
        "",
        f"- negatives: `{config.pairs.negatives}`; pairs: {pairs}",
        f"- loss: `{t.loss}`, beta {t.beta}, learning rate {t.learning_rate:g}, "
        f"batch {t.batch_size} x {t.grad_accumulation}, epochs {t.epochs}, "
        f"steps {t.iters or 'one epoch'}",
        f"- LoRA: rank {lora.rank}, scale {lora.scale}, layers {lora.num_layers}, "
        f"keys {lora.keys or 'all linears'}",
        f"- generation: temperature {config.generation.temperature}, "
        f"top_p {config.generation.top_p}, max tokens {config.generation.max_tokens}",
        "",
        "## Evaluation",
        "",
        evaluation,
        "## Export check",
        "",
        f"- fused vs base + adapters: {check.line()}",
    ]
    if drift is not None:
        lines.append(f"- after re-quantizing to {quantize} bits: {drift.line()}")
    if gguf is not None:
        lines += ["", *gguf_section(gguf)]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from mlx_lm import load, generate",
        "",
        'model, tokenizer = load("<this repo or folder>")',
        "```",
        "",
    ]
    # Parsed back: the front matter is what the Hub will read
    return str(ModelCard("\n".join(lines)))
