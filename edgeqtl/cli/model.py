"""Commands on the workstation: train, evaluate, export and merge split models (torch,
imported inside each command)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import (UserError, describe_split, levels_from, load_tokenizer, set_threads, split_options,
                     threads_option, user_errors)


def split_config_from(cut: int | None, bits: int | None, levels: int | None, baseline: bool,
                      clip_sigmas: float | None = None):
    from edgeqtl.models.split import SplitConfig  # torch

    lv = levels_from(bits, levels)
    if baseline:
        if lv is not None:
            raise UserError("--baseline sends 16-bit hidden states; drop --bits/--levels")
        return SplitConfig(cut=cut or 0, quantizer="fp16")
    return SplitConfig(cut=cut or 0, quantizer="fsq", levels=lv or 4, clip_sigmas=clip_sigmas)


@click.command()
@click.option("--preset", type=click.Choice(["tiny"]), default="tiny", show_default=True,
              help="Built-in model built from config (used when --model is not given).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A local HF Llava checkpoint directory (safetensors) to start from instead.")
@split_options
@click.option("--baseline", is_flag=True,
              help="No quantizer: send 16-bit hidden states (the unquantized baseline).")
@click.option("--steps", type=int, default=None, help="End-to-end training steps (stage 2).")
@click.option("--vision-steps", type=int, default=None, help="Vision alignment steps (stage 1); 0 skips it.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--clip-sigmas", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Quantizer normalisation range in sigmas (default: Gaussian-optimal for the levels, "
                   "1.49 at 2 bits; see docs/TRAINING.md).")
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Save every N steps (0: at the end).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the trained split model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train(preset, model_dir, cut, bits, levels, baseline, steps, vision_steps, batch_size, lr, clip_sigmas, seed,
          threads, checkpoint_every, out, quiet):
    """Train both halves of a split model on the shapes benchmark, in one process.

    Every step passes integer codes from the client half to the server half and the
    gradient back, exactly as the wire will.

    \b
    Example:
      edgeqtl train --preset tiny --cut 0 --bits 2 --out runs/tiny-2bit
      edgeqtl train --preset tiny --baseline --out runs/tiny-fp16
    """
    import dataclasses

    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitModel
    from edgeqtl.models.training import ShapesCollator, TrainConfig, evaluate, image_spec_of
    from edgeqtl.models.training import train as run_training

    set_threads(threads)
    split = split_config_from(cut, bits, levels, baseline, clip_sigmas)
    if model_dir is not None:
        model = load_split_model(model_dir, split)
        tokenizer = load_tokenizer(model_dir)
    else:
        model = SplitModel(build_tiny(seed), split)
        tokenizer = shapes.build_tokenizer()
    overrides = {k: v for k, v in dict(steps=steps, vision_steps=vision_steps, batch_size=batch_size, lr=lr).items()
                 if v is not None}
    if model_dir is not None and vision_steps is None:
        overrides["vision_steps"] = 0  # a real checkpoint's vision tower is pretrained
    cfg = dataclasses.replace(TrainConfig(seed=seed, checkpoint_every=checkpoint_every), **overrides)
    click.echo(f"training {'tiny' if model_dir is None else model_dir} split at cut {model.split.cut}, "
               f"{describe_split(model.split)}, {cfg.steps} steps -> {out}")
    run_training(model, tokenizer, cfg, out_dir=out, progress=not quiet)
    report = evaluate(model, ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model)),
                      shapes.heldout(100))
    click.echo(report.table("quick held-out check (100 per family; `edgeqtl eval` runs the full set):"))
    click.echo(f"saved to {out}")


@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model directory (from `edgeqtl train`).")
@click.option("--per-family", type=int, default=500, show_default=True, help="Held-out questions per family.")
@threads_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@user_errors
def evaluate(model_dir, per_family, threads, json_out):
    """Held-out accuracy per task family, and the bits per sample the client sends
    next to the unquantized 16-bit baseline.

    \b
    Example:
      edgeqtl eval --model runs/tiny-2bit --per-family 500
    """
    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.training import ShapesCollator, evaluate as run_eval, image_spec_of

    set_threads(threads)
    model = load_split_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    report = run_eval(model, ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model)),
                      shapes.heldout(per_family))
    click.echo(report.table(f"{model_dir}: cut {model.split.cut}, {describe_split(model.split)}, "
                            f"{report.n} held-out questions"))
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model (from `edgeqtl train`) or a local HF Llava checkpoint.")
@split_options
@click.option("--target", type=click.Choice(["cpu", "arm64", "jetson"]), default="cpu", show_default=True,
              help="cpu/arm64: fp32 + int8 graphs; jetson: fp16 graph for the CUDA/TensorRT providers.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch on held-out questions; exit 1 if a threshold fails.")
@click.option("--verify-per-family", type=int, default=100, show_default=True)
@user_errors
def export(model_dir, cut, bits, levels, target, out, verify, verify_per_family):
    """Compile the client half into an ONNX device bundle, plus the server half.
    --cut/--bits/--levels apply to a plain checkpoint; a trained model keeps its own.

    \b
    Example:
      edgeqtl export --model runs/tiny-2bit --target arm64 --out bundles/tiny-pi
      edgeqtl export --model ./llava-ckpt --cut 4 --bits 2 --target jetson --out bundles/jetson
    """
    from edgeqtl.export.bundle import ExportOptions, export_bundle

    res = export_bundle(ExportOptions(model_dir, out, cut, levels_from(bits, levels), target, verify,
                                      verify_per_family), progress=click.echo)
    m = res.manifest
    click.echo(f"bundle {out}: cut {m.cut}, {m.quantizer} {m.levels if m.quantizer == 'fsq' else ''} levels, "
               f"target {m.target}, fingerprint {m.fingerprint[:16]}, {res.seconds:.1f} s")
    for name, size in res.files.items():
        click.echo(f"  {size / 1024:10.1f} KiB  {name}")
    if res.verification is not None:
        click.echo(res.verification.table())
        if not res.verification.ok:
            raise UserError("verification failed: the bundle does not reproduce the PyTorch client (table above)")


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="The split model the run started from.")
@click.option("--server-state", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The training server's --state-dir.")
@click.option("--device-state", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The --state-dir of the device whose client half to keep.")
@click.option("--device-id", required=True, help="That device's id.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@user_errors
def merge(model_dir, server_state, device_state, device_id, out):
    """Merge a split-training run into one split model directory (for `edgeqtl export`):
    the server's trained trunk plus one device's trained client parts.

    \b
    Example:
      edgeqtl merge --model runs/start --server-state runs/srv --device-state runs/dev0 \\
          --device-id pi-0001 --out runs/split-trained && edgeqtl export --model runs/split-trained --out bundles/x
    """
    from edgeqtl.models.checkpoint import merge_trained

    click.echo(f"merged into {merge_trained(model_dir, server_state, device_state, device_id, out)}")
