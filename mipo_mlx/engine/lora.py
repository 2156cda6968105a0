"""What trains (lora.type), as mlx-lm names it: LoRA or DoRA adapters on a model's linears, or
the blocks' own weights (full). Attached, switched off to give the reference model, saved and
loaded in mlx-lm's format (adapter_config.json's fine_tune_type).

The reference model of DPO is the very same model object with its adapters switched off
(`adapters_disabled`): never a second copy in memory. A DoRA layer (mlx-lm's DoRALinear) adds a
magnitude `m` per output to LoRA's A and B; with B = 0 and m the base weight's row norms it is
the base layer. Full fine-tuning trains the last lora.num_layers blocks' weights in place; the
base's values of those weights go to a file on disk when training starts, and switching the
"adapters" off swaps them in from there (the trained ones wait in a second file), so that no
second copy of the model is ever held in memory. Training itself never needs the base: the
reference log-probs are stored with the pairs."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..core import reading
from ..core.config import FINE_TUNE_TYPES, LoraConfig
from ..core.errors import UserError
from ..core.files import atomic_path, write_json
from .model import is_quantized

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


def check_fine_tune(model: nn.Module, config: LoraConfig) -> None:
    """lora.type=full trains the base's own weights, which a quantized base does not have in a
    trainable form (mlx-lm refuses it too): stop before any slow stage."""
    if config.type == "full" and is_quantized(model):
        raise UserError(
            "lora.type=full trains the model's own weights, and this base is quantized; use a "
            "full-precision base (model.quantize_bits: null and an unquantized model.path), or "
            "lora.type lora or dora"
        )


def attach_lora(model: nn.Module, config: LoraConfig, seed: int) -> int:
    """Replace linears with LoRA or DoRA layers (B = 0, so the model is unchanged), or for
    full fine-tuning unfreeze the last lora.num_layers blocks; return the trainable count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    check_fine_tune(model, config)
    model.freeze()
    if config.type == "full":
        for block in model.layers[len(model.layers) - num_adapted_layers(model, config) :]:
            block.unfreeze()
        keep_base(model)
        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
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


BASE_FILE = "_mipo_base_weights"  # the model's attribute: the file of a full fine-tune's base


def keep_base(model: nn.Module) -> None:
    """Write the trainable weights as they are now (the base's) to a file of their own, which
    `adapters_disabled` swaps in; removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="mipo_mlx-base-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "base.safetensors"
    write_safetensors(path, dict(tree_flatten(model.trainable_parameters())))
    setattr(model, BASE_FILE, str(path))


def full_base(model: nn.Module) -> Path | None:
    """The file of a fully fine-tuned model's base weights; None for adapters."""
    path = getattr(model, BASE_FILE, None)
    return Path(path) if path else None


@contextmanager
def _base_weights_swapped_in(model: nn.Module, base: Path) -> Iterator[nn.Module]:
    """The trained weights to a file beside the base's, the base's loaded in their place, and
    back after: one copy of the weights in memory at any time."""
    trained = base.with_name("trained.safetensors")
    write_safetensors(trained, dict(tree_flatten(model.trainable_parameters())))
    model.load_weights(list(mx.load(str(base)).items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(list(mx.load(str(trained)).items()), strict=False)
        mx.eval(model.parameters())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The reference model: the same object with each LoRA layer swapped for its base layer
    (for full fine-tuning, the base's weights swapped in from disk).

    Swapping (rather than scale = 0) gives exactly the base computation, with no
    adapter matmuls, and no second copy of any weight.
    """
    base = full_base(model)
    if base is not None:
        with _base_weights_swapped_in(model, base):
            yield model
        return
    lora = lora_modules(model)
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in lora]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(lora))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """What trains and is saved: the adapter layers' A, B (and DoRA's m), or for full
    fine-tuning the trainable blocks' weights."""
    if full_base(model) is not None:
        return dict(tree_flatten(model.trainable_parameters()))
    adapted = {name for name, _ in lora_modules(model)}
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES and k.rsplit(".", 1)[0] in adapted
    }


def base_adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Adapter weights that make the model its base: A and B zero, and for DoRA each magnitude
    the base weight's row norms (what mlx-lm's DoRALinear starts from); for full fine-tuning
    the base's own weights."""
    if full_base(model) is not None:
        return dict(mx.load(str(full_base(model))))
    base = {k: mx.zeros_like(v) for k, v in adapter_weights(model).items()}
    for name, module in lora_modules(model):
        if "m" in module:
            weight = module._dequantized_weight().astype(mx.float32)
            base[f"{name}.m"] = mx.linalg.norm(weight, axis=1)
    return base


def fine_tune_type(model: nn.Module) -> str:
    """'full' for a full fine-tune, 'dora' where the adapter layers are DoRA layers, else
    'lora'."""
    if full_base(model) is not None:
        return "full"
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
    kind = fine_tune_type(model)
    write_json(
        folder / ADAPTER_CONFIG,
        {
            "fine_tune_type": kind,
            "num_layers": num_adapted_layers(model, lora),
            "lora_parameters": None if kind == "full" else lora_parameters(lora),
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
    """Attach LoRA or DoRA layers as `adapter_config.json` says and load
    `adapters.safetensors` into them; for a full fine-tune, load the trained blocks' weights
    (the base's kept on disk for `adapters_disabled`)."""
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
    if kind not in FINE_TUNE_TYPES:
        raise UserError(
            f"{Path(folder) / ADAPTER_CONFIG}: fine_tune_type {kind!r}; this version reads "
            f"{', '.join(FINE_TUNE_TYPES)}"
        )
    try:
        if kind == "full":
            attach_lora(model, LoraConfig(type="full", num_layers=config["num_layers"]), 0)
        else:
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
