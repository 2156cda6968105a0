"""Load a model, quantize it, attach LoRA; switch adapters off to get the reference.

The reference model of DPO is the very same model object with its adapters
switched off (`adapters_disabled`): never a second copy in memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..core.config import ModelConfig
from ..core.errors import UserError
from . import distributed as dist


def _check_local_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: no config.json; point model.path at an mlx-lm/Hugging Face model folder"
        )
    if not list(path.glob("*.safetensors")):
        raise UserError(
            f"{path}: no .safetensors weights (only safetensors are loaded, never pickle)"
        )
    if not any(
        (path / name).is_file()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise UserError(
            f"{path}: no tokenizer files (tokenizer.json / tokenizer.model); "
            "copy them from the base model"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def check_source(name: str, key: str = "model.path") -> None:
    """Fail early on a model that cannot load: a local folder without weights, config or
    tokenizer, or a name that is neither a folder nor a Hub id (org/name)."""
    path = Path(name).expanduser()
    if path.exists():
        _check_local_folder(path)
    elif _looks_like_path(name):
        raise UserError(
            f"{key}={name}: model folder not found; give a local folder or a Hub id like org/name"
        )


def load(config: ModelConfig):
    """Load (model, tokenizer, model_config) with mlx_lm.load; quantize if asked."""
    from mlx_lm import load as mlx_load

    path = Path(config.path).expanduser()
    check_source(config.path)
    with dist.progress(1, f"load {config.path}"):
        try:
            model, tokenizer, model_config = mlx_load(
                str(path) if path.exists() else config.path,
                return_config=True,
                revision=config.revision,
                tokenizer_config={"trust_remote_code": config.trust_remote_code},
                trust_remote_code=config.trust_remote_code,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"{config.path}: could not load the model ({first}); check the folder or repo id"
            ) from None
    if config.quantize_bits and (config.quantize_on_cpu or not on_cpu()):
        with dist.progress(1, f"quantize to {config.quantize_bits} bits"):
            model_config = quantize(
                model, model_config, config.quantize_bits, config.quantize_group_size
            )
    elif config.quantize_bits and not is_quantized(model):
        print(
            "note: model.quantize_bits skipped on the CPU backend, "
            "where MLX's quantized matmul is much "
            "slower than float32 (set model.quantize_on_cpu=true to quantize anyway)",
            file=sys.stderr,
        )
    model.freeze()
    return model, tokenizer, model_config


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's embedding table (token ids must stay below it), where it says."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def pad_id(tokenizer) -> int:
    """The id that pads rows (never scored): the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )


def quantize(model: nn.Module, model_config: dict, bits: int, group_size: int) -> dict:
    """Quantize a full-precision model in place (QLoRA); a quantized one is left as it is."""
    from mlx_lm.utils import quantize_model

    if is_quantized(model):
        return model_config
    _, model_config = quantize_model(model, model_config, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model_config


def set_memory_limit(gigabytes: float) -> None:
    """Cap MLX's memory use (training.memory_limit_gb)."""
    mx.set_memory_limit(int(gigabytes * 1e9))
