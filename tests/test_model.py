"""Model loading, quantize-on-load, LoRA attach, adapters off == base, adapter files."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mipo_mlx.core.config import LoraConfig, ModelConfig
from mipo_mlx.core.errors import UserError
from mipo_mlx.engine import model as mdl
from mipo_mlx.engine.lora import adapters_disabled, attach_lora, lora_modules, save_adapters
from mipo_mlx.engine.toy import parameter_count

TOKENS = mx.array([[1, 5, 9, 40, 41, 42, 7, 8]])


def perturb_adapters(model, seed=0):
    """Give every lora_b random values, as training would, so adapters change the output."""
    mx.random.seed(seed)
    for _, m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.5


@pytest.mark.parametrize("bits", [None, 4])
def test_adapters_off_equals_base_exactly(toy_model_dir, bits):
    model, _, _ = mdl.load(
        ModelConfig(
            path=str(toy_model_dir),
            quantize_bits=bits,
            quantize_group_size=32,
            quantize_on_cpu=True,
        )
    )
    base = model(TOKENS)
    attach_lora(model, LoraConfig(rank=4), seed=0)
    assert mx.array_equal(model(TOKENS), base).item()  # B = 0 at init
    perturb_adapters(model)
    assert not mx.allclose(model(TOKENS), base, atol=1e-3).item()
    with adapters_disabled(model):
        assert mx.array_equal(model(TOKENS), base).item()
    assert not mx.allclose(model(TOKENS), base, atol=1e-3).item()  # adapters are back on


def test_quantize_on_cpu_is_skipped_unless_asked(toy_model_dir, capsys):
    model, _, config = mdl.load(ModelConfig(path=str(toy_model_dir), quantize_bits=4))
    assert mdl.on_cpu() and not mdl.is_quantized(model) and "quantization" not in config
    assert "quantize_bits skipped on the CPU backend" in capsys.readouterr().err


def test_quantize_on_load(toy_model_dir):
    model, _, config = mdl.load(
        ModelConfig(
            path=str(toy_model_dir), quantize_bits=4, quantize_group_size=32, quantize_on_cpu=True
        )
    )
    assert mdl.is_quantized(model)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32


def test_trainable_count_from_formula(toy_model_dir):
    """rank r on every linear of each block: r * (in + out) summed.

    Toy llama, hidden 64, heads 4 (head_dim 16), kv heads 2, intermediate 128:
    q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64
    -> in+out = 128 + 96 + 96 + 128 + 192 + 192 + 192 = 1024; x r=8 x 2 blocks = 16384.
    """
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == parameter_count(
        64, 2, 128, 4, 2, 384, True
    )
    assert attach_lora(model, LoraConfig(rank=8), seed=0) == 16384


def test_lora_keys_and_num_layers(toy_model_dir):
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    n = attach_lora(model, LoraConfig(rank=2, num_layers=1, keys=["self_attn.q_proj"]), seed=0)
    assert n == 2 * (64 + 64)  # one q_proj in the last block only
    assert hasattr(model.layers[1].self_attn.q_proj, "lora_a")
    assert not hasattr(model.layers[0].self_attn.q_proj, "lora_a")


def test_keys_matching_nothing_is_a_user_error(toy_model_dir):
    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    with pytest.raises(UserError, match="matched no layer"):
        attach_lora(model, LoraConfig(keys=["no_such.proj"]), seed=0)


def test_saved_adapters_load_with_mlx_lm(toy_model_dir, tmp_path):
    from mlx_lm import load

    model, _, _ = mdl.load(ModelConfig(path=str(toy_model_dir)))
    lora = LoraConfig(rank=4, scale=10.0)
    attach_lora(model, lora, seed=0)
    perturb_adapters(model)
    expected = model(TOKENS)
    save_adapters(tmp_path, model, lora, str(toy_model_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0}
    loaded, _ = load(str(toy_model_dir), adapter_path=str(tmp_path))
    assert mx.allclose(loaded(TOKENS), expected, atol=1e-5).item()
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved) and len(saved) == 2 * 7 * 2


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "model folder not found"),
        ("no_weights", "no .safetensors"),
        ("no_tokenizer", "no tokenizer files"),
    ],
)
def test_bad_model_folders(toy_model_dir, tmp_path, name, message):
    import shutil

    folder = tmp_path / name
    if name != "missing":
        shutil.copytree(toy_model_dir, folder)
        for pattern in ["*.safetensors"] if name == "no_weights" else ["tokenizer*"]:
            for f in folder.glob(pattern):
                f.unlink()
    with pytest.raises(UserError, match=message):
        mdl.load(ModelConfig(path=str(folder)))
