"""Evaluation scoring (PMI) on few-shot-length prompts: the LM head on every position vs
on the response positions only, in one run; prints time and peak memory of each and ratios.

  python benchmarks/scoring.py [--vocab 32000] [--answers 16]

A random-init qwen2 (hidden 256, 4 layers; the vocabulary is what matters here) scores
each answer under its own prompt and 4 others, as `evaluation.pmi_negatives: 4` does.
Prompts look like the GSM8K 8-shot recipe's: a shared 1,500-token prefix plus a
60-120-token question; answers of 100-200 tokens.

'full logits' is the scorer as it was: rows packed 32 at a time, logits (rows, T, V)
for every position, then the response positions summed. 'no shared prefix' is
`mipo_mlx.engine.scoring.response_logps` with the prefix reuse off: rows sorted by length in
batches of ~16k tokens, the blocks on every token, the LM head and log-softmax on the
response positions only. 'response_logps' is the same with the prefix all prompts share
(the exemplars) run once through the blocks, the rows attending to its keys and values.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen2

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before mlx)
from mipo_mlx.engine.batching import pack
from mipo_mlx.engine.logps import sequence_logps
from mipo_mlx.engine.scoring import response_logps
from mipo_mlx.stages.metrics import other_prompts


def full_logits(model, prompts, responses, pad: int, batch_rows: int = 32) -> np.ndarray:
    out = np.zeros(len(prompts))
    for start in range(0, len(prompts), batch_rows):
        arrays = pack(
            prompts[start : start + batch_rows], responses[start : start + batch_rows], pad
        )
        logps = sequence_logps(model, *map(mx.array, arrays))
        mx.eval(logps)
        out[start : start + len(logps)] = np.array(logps.tolist())
    return out


def measure(name: str, fn) -> tuple[np.ndarray, float, float]:
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    values = fn()
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() / 1e9
    print(f"{name:>20}: {seconds:7.2f} s  peak {peak:6.2f} GB", flush=True)
    return values, seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--answers", type=int, default=16)
    args = parser.parse_args()
    mx.random.seed(0)
    model = qwen2.Model(
        qwen2.ModelArgs(
            model_type="qwen2",
            hidden_size=256,
            num_hidden_layers=4,
            intermediate_size=688,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=args.vocab,
            tie_word_embeddings=False,
        )
    )
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    shared = rng.integers(10, args.vocab, size=1500).tolist()
    prompts = [
        shared + rng.integers(10, args.vocab, size=rng.integers(60, 121)).tolist()
        for _ in range(args.answers)
    ]
    answers = [
        rng.integers(10, args.vocab, size=rng.integers(100, 201)).tolist()
        for _ in range(args.answers)
    ]
    others = other_prompts(args.answers, 4, seed=0)
    rows = [(i, j) for i in range(args.answers) for j in (i, *others[i])]
    row_prompts, row_answers = [prompts[j] for _, j in rows], [answers[i] for i, _ in rows]
    print(
        f"{len(rows)} rows of {min(map(len, row_prompts))}-{max(map(len, row_prompts))} prompt + "
        f"{min(map(len, row_answers))}-{max(map(len, row_answers))} answer tokens, "
        f"vocabulary {args.vocab}"
    )
    old, old_s, old_gb = measure(
        "full logits", lambda: full_logits(model, row_prompts, row_answers, 0)
    )
    plain, plain_s, plain_gb = measure(
        "no shared prefix",
        lambda: response_logps(model, row_prompts, row_answers, 0, min_shared=10**9),
    )
    new, new_s, new_gb = measure(
        "response_logps", lambda: response_logps(model, row_prompts, row_answers, 0)
    )
    gap = max(float(np.abs(old - v).max() / np.abs(old).max()) for v in (plain, new))
    print(f"largest relative difference in log-probs: {gap:.1e}")
    print(f"no shared prefix: speedup={old_s / plain_s:.2f} memory_ratio={plain_gb / old_gb:.2f}")
    print(f"response_logps: speedup={old_s / new_s:.2f} memory_ratio={new_gb / old_gb:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
