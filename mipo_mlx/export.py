"""`python -m mipo_mlx.export`: fuse the adapters, prove the fused model is the trained one, publish.

  python -m mipo_mlx.export --adapters <run-dir> --output <dir> [--quantize {4,8}]
                            [--upload-repo user/name] [--private] [--dry-run] [--force] [--overwrite]

The fused model is de-quantized by default: W = dequantize(W_q) + scale * B^T A^T,
in the base's float dtype, so nothing the adapters learned is rounded away (a
re-quantized fuse can erase small DPO updates). Before anything is written as
final or uploaded, the fused model is checked against base + adapters on the
run's held-out pairs: logits within a tolerance, and chosen-minus-rejected
log-prob margins preserved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, reports_user_errors

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
        return (f"{self.pairs} held-out pairs: max |logit diff| {self.max_logit_diff:.2e}, max |margin diff| "
                f"{self.max_margin_diff:.2e} nats; mean margin gain over the base: adapters "
                f"{self.mean_margin_gain_adapters:+.4f}, fused {self.mean_margin_gain_fused:+.4f}")


def check_pairs(run: Path, limit: int = 16):
    from .pairs import read_pairs

    path = run / "pairs.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; export needs the run's pairs to verify the fused model")
    pairs = read_pairs(path)
    valid = [p for p in pairs if p.split == "valid"] or pairs
    return valid[:limit]


def margins_and_logits(model, pairs, pad: int):
    """(chosen - rejected) summed log-probs per pair, and the logits, in one forward."""
    import mlx.core as mx

    from .score import logits_and_logps, pack

    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    inputs, targets, scored = map(mx.array, pack([p.prompt_ids for p in pairs] * 2, responses, pad))
    logits, logps = logits_and_logps(model, inputs, targets, scored)  # (2B, T, V), (2B,)
    n = len(pairs)
    mask = (inputs != pad) | (scored > 0)  # compare logits only at real positions
    mx.eval(logits, logps)
    return logps[:n] - logps[n:], logits, mask[..., None]


def compare(reference, candidate, base_margins) -> Check:
    import mlx.core as mx

    ref_margin, ref_logits, mask = reference
    new_margin, new_logits, _ = candidate
    diff = mx.abs(new_logits - ref_logits) * mask
    return Check(max_logit_diff=diff.max().item(),
                 max_margin_diff=mx.abs(new_margin - ref_margin).max().item(),
                 mean_margin_gain_adapters=(ref_margin - base_margins).mean().item(),
                 mean_margin_gain_fused=(new_margin - base_margins).mean().item(),
                 pairs=int(ref_margin.shape[0]))


def fuse(model, dequantize: bool = True):
    """Replace every LoRA layer by one linear holding W + scale * B^T A^T (mlx-lm's fuse)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    from .model import lora_modules

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model)]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)  # embeddings and layers without adapters too
    return model


def build(run: Path, quantize: int | None, force: bool):
    """Load base + adapters, fuse (and re-quantize), verify; return (model, tokenizer, config, report)."""
    import mlx.core as mx

    from . import model as mdl
    from .config import from_dict
    from .pipeline import pad_id

    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found; --adapters must be a folder written by mipo_mlx.train")
    import yaml

    config = from_dict(yaml.safe_load(config_path.read_text()), str(config_path))
    model, tokenizer, model_config = mdl.load(config.model)
    pairs = check_pairs(run)
    pad = pad_id(tokenizer)
    base_margins = margins_and_logits(model, pairs, pad)[0]
    mdl.load_adapters(model, run)
    reference = margins_and_logits(model, pairs, pad)
    fuse(model, dequantize=True)
    model_config.pop("quantization", None)
    model_config.pop("quantization_config", None)
    check = compare(reference, margins_and_logits(model, pairs, pad), base_margins)
    print(f"fused (de-quantized) vs base + adapters: {check.line()}")
    tolerance = LOGIT_TOLERANCE.get(str(model.layers[0].self_attn.q_proj.weight.dtype).split(".")[-1], 1e-1)
    if not check.passes(tolerance, MARGIN_TOLERANCE) and not force:
        raise UserError(f"the fused model does not match base + adapters (tolerance {tolerance:g} logits, "
                        f"{MARGIN_TOLERANCE} nats); nothing written. Pass --force to write it anyway")
    drift = None
    if quantize:
        model_config = mdl.quantize(model, model_config, quantize, config.model.quantize_group_size)
        drift = compare(reference, margins_and_logits(model, pairs, pad), base_margins)
        print(f"re-quantized to {quantize} bits vs base + adapters (drift): {drift.line()}")
    mx.eval(model.parameters())
    return model, tokenizer, model_config, config, check, drift


def save_folder(out: Path, model, tokenizer, model_config: dict, card: str) -> list[Path]:
    """Weights, config.json, tokenizer (chat template included) and the model card."""
    from mlx_lm.utils import save_config, save_model

    save_model(out, model)
    save_config(dict(model_config), out / "config.json")
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(card, encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file())


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; choose another --output or pass --overwrite")


def write_atomically(out: Path, write) -> list[Path]:
    """Write into a sibling folder, then swap it in: a failure leaves the old output as it was."""
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    write(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return sorted(p for p in out.rglob("*") if p.is_file())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mipo_mlx.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", required=True, metavar="RUN_DIR", help="folder written by mipo_mlx.train")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the fused model")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="re-quantize the fused model (reports the drift)")
    p.add_argument("--upload-repo", metavar="USER/NAME", help="publish to this Hugging Face Hub repo")
    p.add_argument("--upload-pairs-repo", metavar="USER/NAME", help="also publish pairs.jsonl as a dataset repo")
    p.add_argument("--private", action="store_true", help="make the uploaded repos private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send nothing")
    p.add_argument("--force", action="store_true", help="write even if the fused model fails the check")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    return p


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run, out = Path(args.adapters), Path(args.output)
    from ._backend import require_mlx
    from .card import model_card
    from .hub import publish

    if not run.is_dir():
        raise UserError(f"{run}: not found; --adapters must be a folder written by mipo_mlx.train")
    check_output(out, args.overwrite)
    if args.upload_repo and not args.dry_run:
        from .hub import require_token

        require_token()  # fail before the slow part, not after
    require_mlx()
    model, tokenizer, model_config, config, check, drift = build(run, args.quantize, args.force)
    card = model_card(run, config, model_config, check, drift, args.quantize)
    files = write_atomically(out, lambda folder: save_folder(folder, model, tokenizer, model_config, card))
    print(f"wrote {out} ({len(files)} files); load it with mlx_lm.load('{out}')")
    if args.upload_repo:
        publish(out, args.upload_repo, private=args.private, dry_run=args.dry_run, kind="model")
    if args.upload_pairs_repo:
        publish(run / "pairs.jsonl", args.upload_pairs_repo, private=args.private, dry_run=args.dry_run,
                kind="dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
