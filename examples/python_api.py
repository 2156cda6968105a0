"""MIPO from Python: build the config in code, run the pipeline (or its stages one by one),
then load the adapters with plain mlx-lm.

python examples/python_api.py --model mlx-community/Qwen2.5-0.5B-Instruct-4bit
python examples/python_api.py --toy           # a small random model built on the spot (no download)
python examples/python_api.py --toy --stages  # the same job, stage by stage over one Run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mipo_mlx.core.config import Config
from mipo_mlx.pipeline import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="Hub id or local folder of an mlx-lm chat model")
    parser.add_argument(
        "--toy", action="store_true", help="build a small random llama model to try the API"
    )
    parser.add_argument("--prompts", default=str(Path(__file__).with_name("prompts.jsonl")))
    parser.add_argument("--output", default="runs/python-api")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--stages", action="store_true", help="call the stages one by one instead of run()"
    )
    args = parser.parse_args()

    config = Config()
    if args.toy:
        from mipo_mlx.engine.toy import build_model_folder

        config.model.path = str(build_model_folder(Path(tempfile.mkdtemp()) / "toy-model"))
        config.generation.max_tokens, config.generation.truncated = 24, "keep"
        config.generation.temperature = 1.0
        config.training.learning_rate = 1e-3
    elif args.model:
        config.model.path = args.model
    else:
        parser.error("give --model or --toy")
    config.data.prompts = args.prompts
    config.training.iters = args.steps
    config.output.dir, config.output.overwrite = args.output, True

    pairs, metrics = by_stages(config) if args.stages else by_pipeline(config)
    print(
        f"{len(pairs)} pairs; after {args.steps} steps: loss {metrics['loss']:.4f}, "
        f"reward margin {metrics['rewards/margins']:.4f}"
    )

    # The adapters load with plain mlx-lm, like any LoRA adapters.
    from mlx_lm import generate, load

    model, tokenizer = load(config.model.path, adapter_path=config.output.dir)
    messages = pairs[0].messages
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False
    )
    print("prompt:", messages[-1]["content"])
    print("answer with adapters:", generate(model, tokenizer, prompt=prompt, max_tokens=40))


def by_pipeline(config: Config):
    """The whole job, as `python -m mipo_mlx.train` runs it."""
    result = run(config)
    return result.pairs, result.metrics


def by_stages(config: Config):
    """The stages over one Run: the model answers (pairs), the reference scores them, LoRA
    trains on them; each keeps its result in the run folder (output.dir)."""
    from mipo_mlx.data.prompts import read_source, render_prompts
    from mipo_mlx.stages.pairs import make_pairs
    from mipo_mlx.stages.reference import score_reference, shared_prompt
    from mipo_mlx.stages.run import Run
    from mipo_mlx.stages.training import train

    job = Run.load(config)
    prompts = read_source(config.data.prompts)
    rendered = render_prompts(prompts, job.tokenizer, config.data, config.data.prompts)
    pairs = make_pairs(job, rendered)
    shared = shared_prompt(job, pairs)
    score_reference(job, pairs, shared)
    return pairs, train(job, pairs, shared)


if __name__ == "__main__":
    main()
