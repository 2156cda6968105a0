"""The pre-tokenizer splits of known byte-level BPE tokenizers: the toy models are built with
llama-3's, and the GGUF export names a tokenizer's split as llama.cpp knows it."""

from __future__ import annotations

# llama-3's split (GGUF's 'llama-bpe')
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: digits one at a time (GGUF's 'qwen2')
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
