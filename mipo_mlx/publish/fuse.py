"""The export stage: fuse the adapters into the weights and prove the fused model is the
trained one.

The fused model is de-quantized by default: W = dequantize(W_q) + scale * B^T A^T,
in the base's float dtype, so nothing the adapters learned is rounded away (a
re-quantized fuse can erase small DPO updates). The fused model is checked against
base + adapters on the run's held-out pairs: logits within a tolerance, and
chosen-minus-rejected log-prob margins preserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, save_config, save_model

from ..core.cli import run_config
from ..core.config import Config
from ..core.errors import UserError
from ..core.progress import Progress
from ..core.settings import validate
from ..data.pair_file import read_pairs
from ..engine import model as mdl
from ..engine.batching import pack_rows
from ..engine.logps import token_logps
from ..engine.lora import load_adapters, lora_modules

LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}  # max |logit diff|, by dtype
MARGIN_TOLERANCE = 0.05  # max |margin diff| in nats for the dequantized fuse


@dataclass
class Check:
    max_logit_diff: float  # max |fused - (base + adapters)| over checked logits
    max_margin_diff: float  # max |margin_fused - margin_adapters| over checked pairs, nats
    mean_margin_gain_adapters: float  # mean (margin with adapters - margin of the base)
    mean_margin_gain_fused: float  # the same for the fused model
    pairs: int

    def passes(self, logit_tol: float, margin_tol: float) -> bool:
        return self.max_logit_diff <= logit_tol and self.max_margin_diff <= margin_tol

    def line(self) -> str:
        return (
            f"{self.pairs} held-out pairs: max |logit diff| {self.max_logit_diff:.2e}, "
            f"max |margin diff| {self.max_margin_diff:.2e} nats; "
            f"mean margin gain over the base: adapters {self.mean_margin_gain_adapters:+.4f}, "
            f"fused {self.mean_margin_gain_fused:+.4f}"
        )


def check_pairs(run: Path, limit: int = 16, vocab: int | None = None):
    path = run / "pairs.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path}: not found; export needs the run's pairs to verify the fused model"
        )
    pairs = read_pairs(path, vocab)
    valid = [p for p in pairs if p.split == "valid"] or pairs
    return valid[:limit]


def margins_and_logits(model, pairs, pad: int):
    """(chosen - rejected) summed log-probs per pair, and the logits at every real position,
    from one forward of the model's own call."""
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    rows = pack_rows([p.prompt_ids for p in pairs] * 2, responses, pad)
    logits = model(rows.inputs).astype(mx.float32)  # (2B, T, V)
    flat = logits.reshape(-1, logits.shape[-1])  # (2B * T, V)
    logps = token_logps(flat[rows.positions], rows.targets) @ rows.owners  # (2B,)
    lengths = mx.array(
        [len(p) + len(r) - 1 for p, r in zip([p.prompt_ids for p in pairs] * 2, responses)]
    )
    # (2B, T): compare logits only there
    real = mx.arange(logits.shape[1])[None, :] < lengths[:, None]
    mx.eval(logits, logps)
    n = len(pairs)
    return logps[:n] - logps[n:], logits, real[..., None]


def compare(reference, candidate, base_margins) -> Check:
    ref_margin, ref_logits, mask = reference
    new_margin, new_logits, _ = candidate
    diff = mx.abs(new_logits - ref_logits) * mask
    return Check(
        max_logit_diff=diff.max().item(),
        max_margin_diff=mx.abs(new_margin - ref_margin).max().item(),
        mean_margin_gain_adapters=(ref_margin - base_margins).mean().item(),
        mean_margin_gain_fused=(new_margin - base_margins).mean().item(),
        pairs=int(ref_margin.shape[0]),
    )


def fuse(model, dequantize: bool = True):
    """Replace every LoRA layer by one linear holding W + scale * B^T A^T (mlx-lm's fuse)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model)]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)  # embeddings and layers without adapters too
    return model


@dataclass
class Fused:
    """The fused model and what it was checked on."""

    model: object
    tokenizer: object
    model_config: dict  # config.json of the fused model
    config: Config  # the run's settings
    pairs: list  # the held-out pairs of the checks
    pad: int
    reference: tuple  # base + adapters: (margins (B,), logits (2B, T, V), mask)
    outputs: tuple  # the fused model's, the same way
    base_margins: mx.array  # (B,)
    check: Check


def build(run: Path, force: bool, trust_remote_code: bool = False) -> Fused:
    """Load base + adapters, fuse into de-quantized weights, and check the fused model against
    base + adapters on the run's held-out pairs. The model may run code shipped with it only
    when `trust_remote_code` (this command line) says so, never because the run's config does."""
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{config_path}: not found; --adapters must be a folder written by mipo_mlx.train"
        )
    config = run_config(run, "--trust-remote-code")
    config.model.trust_remote_code = trust_remote_code
    if not config.model.path:
        raise UserError(
            f"{config_path}: model.path is not set; restore the run's config.yaml, or set "
            "model.path in it to the base model the adapters were trained on"
        )
    validate(config, "export")
    model, tokenizer, model_config = mdl.load(config.model)
    pairs = check_pairs(run, vocab=mdl.vocab_size(model))
    pad = mdl.pad_id(tokenizer)
    with Progress(4, "fuse and check") as progress:  # each step a pass over the whole model
        base_margins = margins_and_logits(model, pairs, pad)[0]
        progress.update()
        load_adapters(model, run)
        reference = margins_and_logits(model, pairs, pad)
        progress.update()
        fuse(model, dequantize=True)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
        progress.update()
        outputs = margins_and_logits(model, pairs, pad)
        check = compare(reference, outputs, base_margins)
    print(f"fused (de-quantized) vs base + adapters: {check.line()}")
    tolerance = LOGIT_TOLERANCE.get(
        str(model.layers[0].self_attn.q_proj.weight.dtype).split(".")[-1], 1e-1
    )
    if not check.passes(tolerance, MARGIN_TOLERANCE) and not force:
        raise UserError(
            f"the fused model does not match base + adapters (tolerance {tolerance:g} logits, "
            f"{MARGIN_TOLERANCE} nats); nothing written. Pass --force to write it anyway"
        )
    with Progress(1, "materialize the weights"):
        mx.eval(model.parameters())
    return Fused(
        model, tokenizer, model_config, config, pairs, pad, reference, outputs, base_margins, check
    )


def requantize(fused: Fused, bits: int) -> Check:
    """Quantize the fused model in place; its drift from base + adapters."""
    with Progress(2, f"quantize to {bits} bits and check") as progress:
        fused.model_config = mdl.quantize(
            fused.model, fused.model_config, bits, fused.config.model.quantize_group_size
        )
        progress.update()
        outputs = margins_and_logits(fused.model, fused.pairs, fused.pad)
        drift = compare(fused.reference, outputs, fused.base_margins)
    print(f"re-quantized to {bits} bits vs base + adapters (drift): {drift.line()}")
    return drift


def save_folder(out: Path, model, tokenizer, model_config: dict, card: str) -> list[Path]:
    """Weights, config.json, tokenizer (chat template included) and the model card."""
    with Progress(1, f"save {out}"):
        try:
            save_model(out, model)
        except RuntimeError as err:  # MLX reports a failed write (a full disk) this way
            raise UserError(
                f"--output: could not write the fused weights ({err}); free space on its disk "
                "or choose a writable folder (nothing was written)"
            ) from None
    save_config(dict(model_config), out / "config.json")
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(card, encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file())
