"""Small models of real mlx-lm architectures, built in-process.

Tests, examples and benchmarks need a model folder that `mlx_lm.load` loads
without a network: a config.json of a standard architecture (llama or qwen2),
random-init safetensors weights, and a real byte-level BPE tokenizer with a
chat template. `build_model_folder` writes one in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..data.pretokenizers import LLAMA3_SPLIT

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tom has 3 apples and buys 4 more. How many apples does he have? The answer is 7.",
    "Question: which planet is red? Choices: A) Mars B) Venus. The answer is: A",
    "Please answer in two short sentences and respect the user's preferences.",
    "user assistant system hello thanks yes no maybe because therefore so",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ? . , ! :",
]


def build_tokenizer(
    folder: Path,
    corpus: list[str],
    vocab_size: int,
    split_digits: bool = False,
    max_length: int = 4096,
    llama3_split: bool = False,
):
    """Train a byte-level BPE tokenizer on `corpus` and write the HF tokenizer files.

    `split_digits` makes every digit its own token (numbers spelled digit by digit);
    `llama3_split` pre-splits text with Llama 3's regex, as Llama 3.x tokenizers do."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        byte_level = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif llama3_split:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        byte_level = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return tokenizer


def model_config(
    architecture: str,
    vocab_size: int,
    eos_id: int,
    hidden_size: int,
    layers: int,
    intermediate_size: int,
    heads: int,
    kv_heads: int,
    tie: bool,
) -> dict:
    config = {
        "model_type": architecture,
        "architectures": ["LlamaForCausalLM" if architecture == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tie,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if architecture == "qwen2":
        config["attention_bias"] = True
    return config


def build_model_folder(
    folder: str | Path,
    *,
    architecture: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 384,
    tie_word_embeddings: bool = True,
    corpus: list[str] | None = None,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    llama3_split: bool = False,
    extra_config: dict | None = None,
) -> Path:
    """Write a random-init mlx-lm model folder with a trained tokenizer; return its path.
    `extra_config` adds config.json keys (e.g. Llama 3's rope_scaling)."""
    from mlx_lm.utils import _get_classes, save_config

    folder = Path(folder)
    tokenizer = build_tokenizer(
        folder, corpus or DEFAULT_CORPUS, vocab_size, llama3_split=llama3_split
    )
    vocab = tokenizer.get_vocab_size()
    tokens = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    eos_id = next(t["id"] for t in tokens if t["content"] == "<|im_end|>")
    config = model_config(
        architecture,
        vocab,
        eos_id,
        hidden_size,
        layers,
        intermediate_size,
        heads,
        kv_heads,
        tie_word_embeddings,
    )
    config.update(extra_config or {})
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(dict(config), folder / "config.json")
    return folder


def parameter_count(
    hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tie: bool
) -> int:
    """Parameters of a llama model, from its shape (used to check the builder)."""
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim  # q, o, k, v
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    embed = vocab * hidden * (1 if tie else 2)
    return layers * (attention + mlp + norms) + embed + hidden
