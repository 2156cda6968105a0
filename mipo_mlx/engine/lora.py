"""LoRA and DoRA adapters (lora.type): attached to a model's linears, switched off to give the
reference model, saved and loaded in mlx-lm's format (adapter_config.json's fine_tune_type).

The reference model of DPO is the very same model object with its adapters switched off
(`adapters_disabled`): never a second copy in memory. A DoRA layer (mlx-lm's DoRALinear) adds a
magnitude `m` per output to LoRA's A and B; with B = 0 and m the base weight's row norms it is
the base layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..core import reading
from ..core.config import LoraConfig
from ..core.errors import UserError
from ..core.files import atomic_path, write_json

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # m: DoRA's magnitudes (mlx-lm's names)


def lora_parameters(config: LoraConfig) -> dict:
    params = {"rank": config.rank, "scale": config.scale, "dropout": config.dropout}
    if config.keys:
        params["keys"] = list(config.keys)
    return params


def num_adapted_layers(model: nn.Module, config: LoraConfig) -> int:
    return len(model.layers) if config.num_layers < 0 else min(config.num_layers, len(model.layers))


def check_lora_keys(model: nn.Module, config: LoraConfig) -> None:
    """Every name in lora.keys must be a linear layer of the adapted blocks (checked before
    any slow stage; mlx-lm would skip a name that matches nothing)."""
    if not config.keys:
        return
    blocks = model.layers[len(model.layers) - num_adapted_layers(model, config) :]
    linears = sorted(
        {
            name
            for block in blocks
            for name, module in block.named_modules()
            if isinstance(module, (nn.Linear, nn.QuantizedLinear))
        }
    )
    for key in config.keys:
        if key not in linears:
            raise UserError(
                f"lora.keys: {key!r} is no linear layer of this model; its linears are "
                f"{', '.join(linears)}"
            )


def attach_lora(model: nn.Module, config: LoraConfig, seed: int) -> int:
    """Replace linears with LoRA layers (B = 0, so the model is unchanged); return trainable
    count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(seed)  # lora_a's initialisation
    try:
        linear_to_lora_layers(
            model,
            num_adapted_layers(model, config),
            lora_parameters(config),
            use_dora=config.type == "dora",
        )
    except (KeyError, ValueError) as err:
        raise UserError(f"lora.keys: {err}") from None
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if trainable == 0:
        raise UserError(
            f"lora.keys={config.keys} matched no layer; use names like self_attn.q_proj"
        )
    return trainable


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "lora_a") and hasattr(m, "linear")
    ]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The reference model: the same object with each LoRA layer swapped for its base layer.

    Swapping (rather than scale = 0) gives exactly the base computation, with no
    adapter matmuls, and no second copy of any weight.
    """
    lora = lora_modules(model)
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in lora]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(lora))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    adapted = {name for name, _ in lora_modules(model)}
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES and k.rsplit(".", 1)[0] in adapted
    }


def base_adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Adapter weights that make the model its base: A and B zero, and for DoRA each magnitude
    the base weight's row norms (what mlx-lm's DoRALinear starts from)."""
    base = {k: mx.zeros_like(v) for k, v in adapter_weights(model).items()}
    for name, module in lora_modules(model):
        if "m" in module:
            weight = module._dequantized_weight().astype(mx.float32)
            base[f"{name}.m"] = mx.linalg.norm(weight, axis=1)
    return base


def fine_tune_type(model: nn.Module) -> str:
    """'dora' where the model's adapter layers are DoRA layers, else 'lora'."""
    return "dora" if any("m" in module for _, module in lora_modules(model)) else "lora"


def write_safetensors(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors, with a failed write (full disk, no permission) as one line."""
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as err:
        raise UserError(
            f"{path}: could not write ({err}); make sure the disk has space and the folder is "
            "writable, then resume (what was written before is kept)"
        ) from None


def save_adapters(
    folder: Path, model: nn.Module, lora: LoraConfig, base_model: str, name: str = ADAPTER_WEIGHTS
) -> Path:
    """Write adapters in mlx-lm's format (loads with mlx_lm.load(..., adapter_path=folder))."""
    weights = adapter_weights(model)
    target = folder / name
    # mx.save_safetensors adds the suffix otherwise
    with atomic_path(target, suffix=".safetensors") as tmp:
        write_safetensors(tmp, weights)
    write_json(
        folder / ADAPTER_CONFIG,
        {
            "fine_tune_type": fine_tune_type(model),
            "num_layers": num_adapted_layers(model, lora),
            "lora_parameters": lora_parameters(lora),
            "base_model": base_model,
            "trainer": "mipo_mlx",
        },
    )
    return target


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise UserError(f"{path}: not found; point at a folder written by mipo_mlx.train")
    config = reading.read_json(path, "adapter config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object; point at a folder written by mipo_mlx.train")
    return config


def load_adapters(model: nn.Module, folder: Path) -> None:
    """Attach LoRA layers as `adapter_config.json` says and load `adapters.safetensors` into
    them."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = read_adapter_config(folder)
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{weights_path}: not found; point at a folder written by mipo_mlx.train")
    try:
        weights = mx.load(str(weights_path))
    except (RuntimeError, ValueError, OSError) as err:
        raise UserError(f"{weights_path}: cannot read the adapters ({err})") from None
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UserError(
            f"{Path(folder) / ADAPTER_CONFIG}: fine_tune_type {kind!r}; this version reads lora "
            "and dora adapters"
        )
    try:
        linear_to_lora_layers(
            model, config["num_layers"], config["lora_parameters"], use_dora=kind == "dora"
        )
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(
            f"{Path(folder) / ADAPTER_CONFIG}: unusable LoRA settings ({err})"
        ) from None
    expected = {k: v.shape for k, v in adapter_weights(model).items()}
    wrong = sorted(set(weights) ^ set(expected)) or [
        k for k in weights if weights[k].shape != expected[k]
    ]
    if wrong:
        raise UserError(
            f"{weights_path}: adapters do not fit this base model (first mismatch: {wrong[0]}); "
            "use the base model they were trained on"
        )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
