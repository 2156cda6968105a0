"""The GGUF file checked in llama.cpp itself (llama-cpp-python): its logits against the fused
MLX model's on the run's held-out pairs, and its tokenizer against the Hugging Face one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Max |logit diff| from the fused MLX model in llama.cpp, as a share of the largest |logit|
# (at least 1), by file type. Measured: f32 3e-6 to 3e-5, f16 5e-4 to 8e-4, q8_0 1e-2 to 2e-2
# (BENCHMARKS.md, "GGUF export").
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2}


@dataclass
class GGUFCheck:
    """llama.cpp's logits on the file against the fused MLX model's, on held-out pairs."""

    file_type: str
    max_logit_diff: float  # max |llama.cpp - MLX| over every checked position and token
    logit_scale: float  # largest |logit| of the MLX model there
    max_margin_diff: float  # max |chosen-minus-rejected log-prob margin difference|, nats
    top1_agreement: float  # share of positions where both pick the same next token
    texts_tokenized_alike: int  # texts llama.cpp's tokenizer splits as the HF one does
    texts: int
    sequences: int
    llama_cpp_version: str

    def passes(self) -> bool:
        return (
            self.max_logit_diff <= TOLERANCE[self.file_type] * max(self.logit_scale, 1.0)
            and self.texts_tokenized_alike == self.texts
        )

    def line(self) -> str:
        return (
            f"llama.cpp (llama-cpp-python {self.llama_cpp_version}) on {self.sequences} "
            f"held-out sequences: max |logit diff| {self.max_logit_diff:.2e}, max |margin diff| "
            f"{self.max_margin_diff:.2e} nats, same top token at {self.top1_agreement:.1%} of "
            f"positions (largest |logit| {self.logit_scale:.1f}); tokenizer: "
            f"{self.texts_tokenized_alike}/{self.texts} texts identical"
        )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _same_tokenization(llm, tokenizer, texts: list[str]) -> int:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    same = 0
    for text in texts:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        same += list(ours) == list(hf.encode(text, add_special_tokens=False))
    return same


def check_in_llama_cpp(path: Path, tokenizer, pairs, mlx_margins, mlx_logits, file_type: str):
    """Load the file in llama.cpp and compare its logits with `mlx_logits` (2B, T, V) on the
    pairs' chosen then rejected sequences, and its margins with `mlx_margins` (B,); None where
    llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs]
    sequences += [p.prompt_ids + p.rejected_ids for p in pairs]
    prompts = [len(p.prompt_ids) for p in pairs] * 2
    context = max(len(s) for s in sequences)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_ubatch=context,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: a float32 KV cache, so the check measures the file alone
        type_v=0,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )
    diff, scale, agree, positions, logps = 0.0, 0.0, 0, 0, []
    for row, (tokens, prompt) in enumerate(zip(sequences, prompts)):
        llm.reset()
        llm.eval(tokens)
        got = np.array(llm.scores[: len(tokens) - 1], dtype=np.float32)  # (L-1, V)
        want = np.array(mlx_logits[row, : len(tokens) - 1])  # (L-1, V)
        diff = max(diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += len(tokens) - 1
        picked = _log_softmax(got)[np.arange(len(tokens) - 1), tokens[1:]]  # (L-1,)
        logps.append(float(picked[prompt - 1 :].sum()))
    n = len(pairs)
    margins = np.array(logps[:n]) - np.array(logps[n:])
    texts = [tokenizer.decode(s) for s in sequences[:n]]
    texts += [tokenizer.decode(p.rejected_ids) for p in pairs]
    same = _same_tokenization(llm, tokenizer, texts)
    llm.close()
    return GGUFCheck(
        file_type=file_type,
        max_logit_diff=diff,
        logit_scale=scale,
        max_margin_diff=float(np.abs(margins - np.array(mlx_margins)).max()),
        top1_agreement=agree / max(positions, 1),
        texts_tokenized_alike=same,
        texts=len(texts),
        sequences=len(sequences),
        llama_cpp_version=getattr(llama_cpp, "__version__", "?"),
    )
