"""The fused model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

The file is written with the `gguf` package, the writer llama.cpp maintains, one tensor at a
time (no second copy of the model in memory). Tensors get llama.cpp's names; llama's query
and key rows are permuted from the Hugging Face rotary layout (halves) to llama.cpp's
(interleaved pairs), as llama.cpp's own converter does. The tokenizer goes in the metadata:
byte-level BPE tokens, merges, token types, special ids, the pre-tokenizer's name and the
chat template.

Supported: llama (Llama 3.x, the embedded model) and qwen2 (Qwen2.5), with the byte-level
BPE tokenizers their families use. `export` writes the file and has it checked in llama.cpp
itself (gguf_check.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.errors import UserError
from ..core.progress import Progress
from ..core.settings import apply, load_yaml
from ..data.pretokenizers import LLAMA3_SPLIT, QWEN2_SPLIT
from .gguf_check import TOLERANCE, check_in_llama_cpp

ARCHITECTURES = ("llama", "qwen2")  # config.json's model_type = gguf's architecture name
FILE_TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block: 32 int8 and one float16 scale (34 bytes)

# The Split regexes of the byte-level BPE pre-tokenizers llama.cpp knows by name
PRE_TOKENIZERS = {  # the tokenizer.json pre-tokenizer, reduced by `_steps` -> llama.cpp's name
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # digits one by one, then GPT-2's regex
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def check_architecture(model_config: dict, where: str) -> None:
    kind = model_config.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(
            f"{where}: model_type {kind!r} has no GGUF export here; supported: "
            f"{', '.join(ARCHITECTURES)}. Export without --gguf and convert with llama.cpp's "
            "convert_hf_to_gguf.py"
        )


def _steps(pre: dict | None) -> tuple:
    """A pre-tokenizer as a tuple of (kind, setting) steps, Sequences flattened."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", []) for step in _steps(p))
    setting = {
        "ByteLevel": lambda: pre.get("use_regex", True),
        "Digits": lambda: pre.get("individual_digits", False),
        "Split": lambda: (pre.get("pattern") or {}).get("Regex"),
    }.get(kind, lambda: json.dumps(pre, sort_keys=True))()
    return ((kind, setting),)


def pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; a UserError if it has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.json; GGUF export needs a byte-level BPE one")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    name = PRE_TOKENIZERS.get(_steps(tokenizer.get("pre_tokenizer")))
    if (tokenizer.get("model") or {}).get("type") != "BPE" or name is None:
        raise UserError(
            f"{path}: this tokenizer's pre-tokenizer has no llama.cpp name known here "
            f"(known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); export without "
            "--gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return name


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from the halves layout (HF rotate_half) to interleaved pairs."""
    split = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])  # (H, 2, D/2, ...)
    return split.swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(config: dict, scaling: dict) -> np.ndarray:
    """Llama 3.x's per-frequency RoPE scaling, stored as llama.cpp's rope_freqs tensor."""
    dim, base = _head_dim(config), config.get("rope_theta", 10000.0)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _hyperparameters(writer, config: dict, vocab: int) -> np.ndarray | None:
    """The architecture's metadata; returns the rope_freqs tensor where the model has one."""
    import gguf

    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(_head_dim(config))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        return _llama3_rope_factors(config, scaling)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind != "default":
        raise UserError(f"config.json: rope_scaling type {kind!r} has no GGUF export here")
    return None


def _vocabulary(writer, folder: Path, tokenizer, vocab: int) -> None:
    """Tokens in id order with their types, then merges, special ids and the chat template."""
    import gguf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF one
    by_id = {i: token for token, i in hf.get_vocab().items()}
    added, decoder = hf.get_added_vocab(), hf.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab):
        token = by_id.get(i)
        if token is None:  # rows the embedding has beyond the tokenizer (padding)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            special = token in added and decoder[i].special
            user = token in added and not special
            types.append(
                gguf.TokenType.CONTROL
                if special
                else gguf.TokenType.USER_DEFINED
                if user
                else gguf.TokenType.NORMAL
            )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab).add_to_gguf(writer, quiet=True)


def _ggml_type(shape: tuple, file_type: str):
    """The stored type of a tensor: norms and biases stay float32, as in llama.cpp's own
    files; a matrix whose rows are not whole q8_0 blocks is written in float16."""
    import gguf

    t = gguf.GGMLQuantizationType
    if len(shape) == 1 or file_type == "f32":
        return t.F32
    return t.Q8_0 if file_type == "q8_0" and shape[-1] % Q8_BLOCK == 0 else t.F16


def _encode(data: np.ndarray, ggml_type) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(data.astype(np.float32, copy=False), ggml_type)


def _tensors(model, config: dict):
    """(gguf name, shape, a function giving the float32 array) for every weight, in a fixed
    order: the arrays are made one at a time, when written."""
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[config["model_type"]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    rows_of = {".q_proj.": heads, ".k_proj.": config.get("num_key_value_heads") or heads}
    for name, weight in tree_flatten(model.parameters()):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"the fused model's tensor {name} has no GGUF name; nothing written")
        permute = next((h for key, h in rows_of.items() if key in name), None)
        if config["model_type"] != "llama":  # qwen2 uses the halves layout in llama.cpp too
            permute = None

        def array(weight=weight, permute=permute) -> np.ndarray:
            data = np.array(weight.astype(mx.float32))
            return data if permute is None else _permute(data, permute)

        yield target, tuple(weight.shape), array


def _byte_size(shape: tuple, ggml_type) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * size


def write_gguf(
    path: Path, model, tokenizer, folder: Path, config: dict, file_type: str, name: str
) -> None:
    """Write the model (float weights) as one GGUF file named `name` inside; `folder` holds
    its tokenizer files."""
    import gguf

    vocab = model.model.embed_tokens.weight.shape[0]
    writer = gguf.GGUFWriter(str(path), config["model_type"])
    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[file_type]
    )
    rope_factors = _hyperparameters(writer, config, vocab)
    _vocabulary(writer, folder, tokenizer, vocab)
    extra = []
    if rope_factors is not None:
        extra.append(("rope_freqs.weight", rope_factors.shape, lambda: rope_factors))
    tensors = [*_tensors(model, config), *extra]
    # First the table of contents (shapes and sizes), then the data, made one at a time
    for name, shape, _ in tensors:
        kind = _ggml_type(shape, file_type)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _byte_size(shape, kind), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape, array in tensors:
        writer.write_tensor_data(_encode(array(), _ggml_type(shape, file_type)))
    writer.close()


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the file: Ollama takes the chat template from the GGUF
    metadata; the end-of-turn token is a stop sequence."""
    eos = getattr(tokenizer, "eos_token", None)
    lines = [f"FROM ./{gguf_name}"]
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def _base_files(run: Path) -> Path | None:
    """The local folder (or Hub cache snapshot) of the run's base model, where there is one."""
    config_path = run / "config.yaml"
    if not config_path.is_file():
        return None  # export's own check reports it
    path = apply(Config(), load_yaml(config_path), str(config_path)).model.path
    if path and (Path(path) / "config.json").is_file():
        return Path(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json") if path else None
    except ValueError:  # not a repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_base(run: Path) -> None:
    """Before any slow stage: the base model's architecture and tokenizer have a GGUF form
    (where its files are on this machine; else the same checks run after loading)."""
    folder = _base_files(run)
    if folder is not None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        check_architecture(config, str(folder / "config.json"))
        if (folder / "tokenizer.json").is_file():
            pre_tokenizer(folder)


def export(folder: Path, fused, file_type: str, force: bool) -> dict:
    """Write `model-<type>.gguf` and a Modelfile into `folder` (the export being written) and
    check the file in llama.cpp; returns what the model card reports."""
    check_architecture(fused.model_config, "the base model's config.json")
    fused.tokenizer.save_pretrained(str(folder))  # the metadata is read from these files
    name = f"model-{file_type}.gguf"
    with Progress(1, f"write {name}"):
        title = f"{Path(fused.config.model.path).name} + MIPO"
        config = fused.model_config
        write_gguf(folder / name, fused.model, fused.tokenizer, folder, config, file_type, title)
    with Progress(1, f"check {name} in llama.cpp"):
        margins, logits, _ = fused.outputs
        check = check_in_llama_cpp(
            folder / name, fused.tokenizer, fused.pairs, margins, logits, file_type
        )
    if check is None:
        print(
            f"{name}: NOT verified: llama-cpp-python is not installed "
            "(pip install 'mipo_mlx[gguf-check]' builds it; export again to check the file)"
        )
    else:
        print(f"{name} vs the fused model: {check.line()}")
        if not check.passes() and not force:
            raise UserError(
                f"{name} does not match the fused model in llama.cpp (tolerance "
                f"{TOLERANCE[file_type]:g} x the largest |logit|, every text tokenized alike); "
                "nothing written. Pass --force to write it anyway"
            )
    (folder / "Modelfile").write_text(modelfile(name, fused.tokenizer), encoding="utf-8")
    size = (folder / name).stat().st_size
    return {"file": name, "type": file_type, "bytes": size, "check": check}
