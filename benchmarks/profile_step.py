"""Where a training step's time goes: one step of `benchmarks/run.py --quick`'s chat workload
(the quick model, 2 pairs, prompts 200-400 and responses 100-200 tokens, shared prompt, LoRA
rank 8 on every block), timed by parts.

    python benchmarks/profile_step.py            # after `python benchmarks/run.py --quick`

MLX has no CPU profiler, so each part runs alone, forward and backward (`mx.vjp` with a
given cotangent, so that no extra element-wise pass is added), at the step's own shapes:
- the whole step, compiled, as training runs it (loss, gradients, clipping, AdamW);
- the blocks (the prompt pass and the response rows), up to the scored positions' hidden
  states, and, at the same token counts, the blocks' linear layers alone (BLAS) and
  attention alone; the rest of the blocks (norms, RoPE, SiLU and the gate product,
  residual adds, LoRA's small products, concatenations) is what is left;
- the LM head on the scored positions (BLAS);
- mipo_mlx's log-softmax of the scored positions (element-wise: logsumexp and the gather).
Each part is the median of `--repeats` timed runs after two warm-ups.

Two CPU levers are measured against the forms they replaced, in the same run, with ratios:
the log-softmax with `exp` as a power of 2 (against `mx.logsumexp` and its own gradient),
and the blocks in chunks of `prefix.CPU_CHUNK` tokens (against one pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (what the benchmark scripts share)
import mlx.core as mx  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which returns arrays to evaluate) after two warm-ups."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def plain_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """token_logps as it was on every device: `mx.logsumexp` and MLX's own gradient."""
    logits = logits.astype(mx.float32)
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(
        logits, axis=-1
    )


def setup(model_dir: Path, pairs_file: Path):
    from mipo_mlx.core.config import LoraConfig, TrainingConfig
    from mipo_mlx.engine.batching import pack_pairs
    from mipo_mlx.engine.lora import attach_lora

    model, _ = harness.load_model({"model": str(model_dir)})
    rows = json.loads(pairs_file.read_text())
    config = TrainingConfig(batch_size=len(rows), warmup_fraction=0.0)
    pairs, shared, _ = harness.scored_pairs(model, rows, config.shared_prompt)
    attach_lora(model, LoraConfig(**harness.LORA), seed=0)
    return model, pack_pairs(pairs, 0, shared), config, shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "out"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    out = Path(args.out)
    model_dir, pairs_file = out / "model-quick", out / "pairs-chat-quick.json"
    if not pairs_file.exists():
        print(
            "benchmarks/profile_step.py: run `python benchmarks/run.py --quick` first "
            f"(it writes {model_dir} and {pairs_file})",
            file=sys.stderr,
        )
        return 2
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mipo_mlx.engine.logps import token_logps
    from mipo_mlx.engine.prefix import AfterPrefix, body_and_head, chunked, prefix_keys
    from mipo_mlx.engine.trainer import make_loss, make_optimizer, make_step

    model, batch, config, shared = setup(model_dir, pairs_file)
    tree = batch.tree()
    r = args.repeats
    parts: dict[str, float] = {}
    levers: dict[str, float] = {}  # the forms the CPU levers replaced, timed alike
    gaps: dict[str, float] = {}
    shapes = {
        "shared prompt": shared,
        "prefix rows x width": list(tree["prefix"].shape),
        "rows x width": list(tree["inputs"].shape),
        "scored positions": tree["positions"].shape[0],
    }

    step = make_step(model, make_optimizer(config, 100), make_loss(config), config)
    state = [model.state]

    def one_step():
        metrics, _ = step(tree, None, True)
        return [metrics["loss"], *state]

    parts["whole step (compiled)"] = timed(one_step, r)

    body, head = body_and_head(model)
    params = model.trainable_parameters()

    names, values = zip(*tree_flatten(params))

    def hidden_of(*arrays, chunk=None):
        """As scored_logits: in chunks (`chunk` None: the CPU's) or one pass (a large chunk)."""
        model.update(tree_unflatten(list(zip(names, arrays))))
        if not shared:
            hidden = body(tree["inputs"])
        else:
            records = prefix_keys(model, tree["prefix"], chunk)
            n = tree["inputs"].shape[0] // records[0].keys.shape[0]
            cache = [AfterPrefix(x, tree["prefix_lengths"], n) for x in records]
            hidden = chunked(body, tree["inputs"], cache, chunk)
        return hidden.reshape(-1, hidden.shape[-1])[tree["positions"]]

    hidden = hidden_of(*values)
    mx.eval(hidden)
    cot_hidden = mx.random.normal(hidden.shape).astype(hidden.dtype)
    parts["blocks (prompt pass + rows)"] = timed(
        lambda: mx.vjp(hidden_of, list(values), [cot_hidden])[1], r
    )
    one_pass = partial(hidden_of, chunk=1 << 30)
    got = mx.vjp(hidden_of, list(values), [cot_hidden])
    want = mx.vjp(one_pass, list(values), [cot_hidden])
    levers["blocks in one pass"] = timed(lambda: mx.vjp(one_pass, list(values), [cot_hidden])[1], r)
    gaps["blocks in chunks against one pass, relative"] = max(
        (mx.abs(a - b).max() / mx.abs(b).max()).item()
        for a, b in zip(got[0] + got[1], want[0] + want[1])
    )
    logits = head(hidden)
    mx.eval(logits)
    cot_logits = mx.random.normal(logits.shape).astype(logits.dtype)
    parts["LM head on the scored positions"] = timed(
        lambda: mx.vjp(head, [hidden], [cot_logits])[1], r
    )
    targets = tree["targets"]
    cot_k = mx.random.normal(targets.shape)
    parts["log-softmax of the scored positions"] = timed(
        lambda: mx.vjp(lambda x: token_logps(x, targets), [logits], [cot_k])[1], r
    )

    # The log-softmax as it was: the same log-probs and gradient
    got = mx.vjp(lambda x: token_logps(x, targets), [logits], [cot_k])
    want = mx.vjp(lambda x: plain_token_logps(x, targets), [logits], [cot_k])
    levers["log-softmax with mx.logsumexp"] = timed(
        lambda: mx.vjp(lambda x: plain_token_logps(x, targets), [logits], [cot_k])[1], r
    )
    gaps["log-softmax with exp as a power of 2 against mx.logsumexp"] = max(
        mx.abs(got[0][0] - want[0][0]).max().item(), mx.abs(got[1][0] - want[1][0]).max().item()
    )

    # The blocks' linear layers alone, at the tokens each pass feeds them: BLAS
    tokens = {"prompt pass": tree["prefix"].size if shared else 0, "rows": tree["inputs"].size}
    linear = 0.0
    for layer in model.layers[:1]:
        for name, m in layer.named_modules():
            if not isinstance(m, nn.Linear) or "lora" in name:
                continue
            w = m.weight
            for n in tokens.values():
                if n == 0:
                    continue
                x = mx.random.normal((n, w.shape[1])).astype(w.dtype)
                g = mx.random.normal((n, w.shape[0])).astype(w.dtype)
                mx.eval(x, g)
                linear += timed(lambda x=x, g=g, w=w: mx.vjp(lambda a: a @ w.T, [x], [g])[1], r)
    parts["  of which linear layers (BLAS)"] = linear * len(model.layers)

    # Attention alone (mx.fast.scaled_dot_product_attention, as mlx-lm calls it)
    a = model.args
    heads, kv, d = (
        a.num_attention_heads,
        a.num_key_value_heads,
        a.hidden_size // a.num_attention_heads,
    )
    attention = 0.0
    passes = []
    if shared:
        p, w = tree["prefix"].shape
        passes.append((p, w, w, "causal"))
        nrows, t = tree["inputs"].shape
        passes.append((nrows, t, w + t, None))
    else:
        nrows, t = tree["inputs"].shape
        passes.append((nrows, t, t, "causal"))
    for rows_, q_len, k_len, mask in passes:
        q = mx.random.normal((rows_, heads, q_len, d))
        k = mx.random.normal((rows_, kv, k_len, d))
        v = mx.random.normal((rows_, kv, k_len, d))
        g = mx.random.normal((rows_, heads, q_len, d))
        m = mask if mask else mx.ones((rows_, 1, q_len, k_len), dtype=mx.bool_)
        mx.eval(q, k, v, g)

        def sdpa(q, k, v, m=m):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=m)

        attention += timed(lambda q=q, k=k, v=v, g=g, f=sdpa: mx.vjp(f, [q, k, v], [g])[1], r)
    parts["  of which attention"] = attention * len(model.layers)
    parts["  of which the rest of the blocks"] = (
        parts["blocks (prompt pass + rows)"]
        - parts["  of which linear layers (BLAS)"]
        - parts["  of which attention"]
    )
    parts["optimizer and the rest of the step"] = parts["whole step (compiled)"] - sum(
        parts[k]
        for k in (
            "blocks (prompt pass + rows)",
            "LM head on the scored positions",
            "log-softmax of the scored positions",
        )
    )
    ratios = {
        "blocks_chunked_speedup": levers["blocks in one pass"]
        / parts["blocks (prompt pass + rows)"],
        "log_softmax_speedup": levers["log-softmax with mx.logsumexp"]
        / parts["log-softmax of the scored positions"],
    }
    report = {
        "shapes": shapes,
        "seconds": parts,
        "before": levers,
        "largest_difference": gaps,
        "ratios": ratios,
    }
    (out / "profile_step.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(shapes))
    total = parts["whole step (compiled)"]
    for name, s in parts.items():
        print(f"{name:42s} {1000 * s:8.1f} ms  {100 * s / total:5.1f}%")
    print("as before (same shapes, same run):")
    for name, s in levers.items():
        print(f"  {name:40s} {1000 * s:8.1f} ms")
    for name, gap in gaps.items():
        print(f"  largest difference, {name}: {gap:.2e}")
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
