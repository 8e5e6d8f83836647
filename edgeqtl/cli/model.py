"""Commands on the workstation: train, evaluate, export and merge split models (torch,
imported inside each command)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .common import (UserError, data_options, describe_split, levels_from, set_threads, split_options,
                     threads_option, user_errors)

# models.reduce.REDUCERS, named here so that `--help` needs no torch (a test keeps them equal)
REDUCER_CHOICES = ["divprune", "attention", "pool", "random", "fastv"]


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
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="Built-in model built from config, trained from scratch (when --model is not given): tiny "
                   "(4 image tokens, the shapes world) or small (64 image tokens, the scenes world).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A pretrained local HF Llava checkpoint (safetensors): adapt a fresh quantizer to it, "
                   "the VLM frozen (needs --data).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Train on your own data: LLaVA records (JSON list or JSON lines), see `edgeqtl data`.")
@click.option("--eval-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Held-out records for figures during and after training.")
@data_options
@split_options
@click.option("--baseline", is_flag=True,
              help="No quantizer: send 16-bit hidden states (the unquantized baseline).")
@click.option("--steps", type=int, default=None, help="Training steps (from scratch: stage 2).")
@click.option("--vision-steps", type=int, default=None, help="From scratch: alignment steps (stage 1); 0 skips it.")
@click.option("--probe", type=click.Choice(["cells", "pixels", "none"]), default=None,
              help="From scratch: stage 1's probe (default: cells on the built-in world, pixels with --data).")
@click.option("--curriculum-steps", type=int, default=None,
              help="From scratch on the built-in world: objects per image ramp up over these steps (0: off).")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--clip-sigmas", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Quantizer normalisation range in sigmas (default: Gaussian-optimal for the levels, "
                   "1.49 at 2 bits; see docs/TRAINING.md).")
@click.option("--rate-weight", type=click.FloatRange(0), default=None,
              help="From scratch: lambda of the rate term, the codes' estimated bits per element added to the loss "
                   "(docs/RATE.md). 0 (default): off.")
@click.option("--trainable", default="quantizer", show_default=True,
              help="With --model: what trains, from quantizer, projector, lora (adapters on the trunk's first "
                   "layers after the cut).")
@click.option("--bf16", is_flag=True, help="With --model: bf16 autocast (faster on CPUs and GPUs that have it).")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Held-out figures every N steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Save every N steps (0: at the end).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the trained split model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--image-tokens", default=None, metavar="K",
              help="Train with K of each image's tokens kept on the device (a count or a fraction such as 0.125); "
                   "the model keeps its reducer, and export uses it.")
@click.option("--reducer", type=click.Choice(REDUCER_CHOICES), default=None,
              help="How --image-tokens chooses (default divprune; `edgeqtl export --help` says what each does).")
@click.option("--exact-text", is_flag=True,
              help="From scratch at cut 0: train with the prompt's text reaching the trunk as its own embeddings "
                   "(the server embeds the prompt ids), so only the image passes the quantizer (adaptation of "
                   "a pretrained --model always does this).")
@user_errors
def train(preset, model_dir, data, eval_data, image_root, skip_bad, cut, bits, levels, baseline, steps, vision_steps,
          probe, curriculum_steps, batch_size, lr, clip_sigmas, rate_weight, trainable, bf16, eval_every, seed, threads,
          checkpoint_every, out, quiet, image_tokens, reducer, exact_text):
    """Train a split model in one process, through the very path the wire takes (codes
    up, the gradient at the codes back).

    \b
    From scratch (--preset): on the built-in shapes world, or on your records (--data),
    with a word vocabulary built from them.
    A pretrained checkpoint (--model ... --data): quantizer adaptation. The VLM stays
    frozen; a fresh quantizer learns by self-distillation against the unsplit model
    (records without an answer are answered by it).

    \b
    Example:
      edgeqtl train --preset tiny --cut 0 --bits 2 --out runs/tiny-2bit
      edgeqtl train --preset tiny --baseline --out runs/tiny-fp16
      edgeqtl train --preset tiny --data mine/train.json --eval-data mine/test.json --out runs/mine
      edgeqtl train --model ckpt/ --bits 2 --data mine/train.jsonl --eval-data mine/test.jsonl --out runs/adapted
    """
    import dataclasses

    from edgeqtl.models import jobs
    from edgeqtl.models.adapt import AdaptConfig
    from edgeqtl.models.presets import build_preset, get_preset
    from edgeqtl.models.reduce import reduce_image_tokens
    from edgeqtl.models.split import SplitModel
    from edgeqtl.worlds import get_world

    set_threads(threads)
    split = split_config_from(cut, bits, levels, baseline, clip_sigmas)
    if exact_text:
        split = dataclasses.replace(split, exact_text=True)  # refused but at cut 0 with a quantizer
    given = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr).items() if v is not None}
    opts = jobs.DataOptions(data, eval_data, image_root, skip_bad) if data is not None else None
    if model_dir is not None and rate_weight:
        raise UserError("--rate-weight trains from scratch (--preset); quantizer adaptation does not take it yet")
    if rate_weight:
        given["rate_weight"] = rate_weight
    if model_dir is not None:
        if data is None:
            raise UserError("quantizer adaptation needs your data: --data FILE (LLaVA records; `edgeqtl data "
                            "export --world shapes` writes the built-in world as one)")
        cfg = dataclasses.replace(AdaptConfig(seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every,
                                              trainable=tuple(t.strip() for t in trainable.split(",")), bf16=bf16),
                                  **given)
        jobs.adapt_records(model_dir, split, cfg, opts, out, click.echo, progress=not quiet,
                           image_tokens=image_tokens, reducer=reducer)
    else:
        spec = get_preset(preset)
        base = spec.train_config(seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every)
        if data is not None:
            base = dataclasses.replace(base, probe="pixels")  # records carry no scene labels
        cfg = dataclasses.replace(base, **given, **({"probe": probe} if probe is not None else {}),
                                  **({"vision_steps": vision_steps} if vision_steps is not None else {}),
                                  **({"curriculum_steps": curriculum_steps} if curriculum_steps is not None else {}))
        model = SplitModel(build_preset(spec, seed), split)  # checks the split against the preset before anything runs
        reduce_image_tokens(model, image_tokens, reducer)
        click.echo(f"training {preset} split at cut {split.cut}, {describe_split(split)}, {cfg.steps} steps on "
                   f"{data or f'the {spec.world} world'} -> {out}")
        if data is not None:
            jobs.train_records(split, cfg, opts, out, click.echo, seed, progress=not quiet, preset=spec,
                               image_tokens=image_tokens, reducer=reducer)
        else:
            jobs.train_world(model, cfg, out, click.echo, progress=not quiet, world=get_world(spec.world))
    click.echo(f"saved to {out}")


@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model directory (from `edgeqtl train`).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Your held-out records (LLaVA format): answers generated greedily, normalised exact match. "
                   "Without it: the held-out set of the built-in world the model was trained on.")
@data_options
@click.option("--per-family", type=int, default=500, show_default=True,
              help="Without --data: held-out questions per family.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="With --data: answer length limit.")
@threads_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON: accuracy (a fraction), records, per_category, ...")
@user_errors
def evaluate(model_dir, data, image_root, skip_bad, per_family, max_new_tokens, threads, json_out):
    """Held-out accuracy of a split model, per category, and the bytes the client sends
    next to the unquantized 16-bit baseline (built-in world). For an adapted checkpoint,
    also how often its answers equal the unsplit model's.

    \b
    Example:
      edgeqtl eval --model runs/tiny-2bit --per-family 500
      edgeqtl eval --model runs/adapted --data mine/test.jsonl --json runs/adapted/eval.json
    """
    from edgeqtl.models import jobs
    from edgeqtl.models.load import load_prompts, load_split_model, read_split_meta, world_of

    set_threads(threads)
    model = load_split_model(model_dir)
    prompts = load_prompts(model_dir, model)
    title = f"{model_dir}: cut {model.split.cut}, {describe_split(model.split)}"
    if data is None:
        report = jobs.eval_world(model, prompts, per_family, world_of(model_dir))
        click.echo(report.table(f"{title}, {report.n} held-out questions"))
    else:
        opts = jobs.DataOptions(data, None, image_root, skip_bad, max_new_tokens)
        records = jobs.checked(data, opts, model, prompts, click.echo)
        report = jobs.eval_records(model, prompts, records, max_new_tokens,
                                   with_agreement=bool(read_split_meta(model_dir).get("adapted")))
        click.echo(report.table(f"{title}, {report.records} records of {data}"))
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
@click.option("--verify-per-family", type=int, default=100, show_default=True,
              help="Built-in world: held-out questions per family that verification runs.")
@click.option("--calibration-data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Images like the device will see (a folder of images or a LLaVA data file): the entropy "
                   "model and verification use them. Default: the built-in world's images.")
@click.option("--calibration-samples", type=int, default=None,
              help="Images that fit the entropy model (default: 256; 32 at real size).")
@click.option("--verify-samples", type=int, default=None,
              help="With --calibration-data or at real size: images verification runs (default 4).")
@click.option("--batch-size", type=int, default=None,
              help="PyTorch batch while calibrating and verifying (default: 64 rows for short sequences, fewer for long "
                   "ones; 2 at real size).")
@click.option("--prompt-ids/--prompt-codes", "prompt_ids", default=None,
              help="At cut 0 (the default there): the prompt's text goes up as token ids and the server embeds "
                   "them, so the device bundle has no token-embedding table. --prompt-codes: the text as codes too "
                   "(for servers older than protocol version 2).")
@click.option("--image-tokens", default=None, metavar="K",
              help="Keep K of each image's tokens on the device (a count, or a fraction such as 0.125): fewer bytes "
                   "up, a shorter device and server prefill. Default: the model's own (all, unless it was trained "
                   "with a reducer).")
@click.option("--reducer", type=click.Choice(REDUCER_CHOICES), default=None,
              help="How --image-tokens chooses: divprune (diversity; the default), attention (VisionZip: the "
                   "tokens the tower attends to most, plus merged context), pool (average over the grid), random "
                   "(seeded: the control), fastv (at --cut 1 or more: the tokens the prompt's last token attends "
                   "to most in the device's last layer; the device's layers still see every token).")
@click.option("--image-splitting", is_flag=True,
              help="SmolVLM at cut 0: split each image into up to 4 x 4 tiles of 512 px plus a global view, as its "
                   "processor does (64 image tokens each: more detail, more bytes); default: the global view alone.")
@user_errors
def export(model_dir, cut, bits, levels, target, out, verify, verify_per_family, calibration_data,
           calibration_samples, verify_samples, batch_size, prompt_ids, image_tokens, reducer, image_splitting):
    """Compile the client half into an ONNX device bundle, plus the server half.
    --cut/--bits/--levels apply to a plain checkpoint; a trained model keeps its own.

    \b
    Example:
      edgeqtl export --model runs/tiny-2bit --target arm64 --out bundles/tiny-pi
      edgeqtl export --model ./llava-ckpt --cut 4 --bits 2 --target jetson --out bundles/jetson \\
          --calibration-data data/mine.jsonl
    """
    from edgeqtl.export.bundle import ExportOptions, export_bundle

    res = export_bundle(ExportOptions(model_dir, out, cut, levels_from(bits, levels), target, verify,
                                      verify_per_family, calibration_data, calibration_samples, verify_samples,
                                      batch_size, prompt_ids, image_tokens, reducer, image_splitting),
                           progress=click.echo)
    if res.manifest.prompt_ids:
        click.echo("prompt ids: the text goes up as token ids; the bundle has no token-embedding table")
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


@click.command()
@click.argument("name", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write the checkpoint to.")
@click.option("--scale", type=click.FloatRange(0.01, 1.0), default=1.0, show_default=True,
              help="Widths and depths times this (below 1: a small model of the same structure, for tests).")
@user_errors
def zoo(name, out, scale):
    """Write a random-weight checkpoint of a published VLM, built from its config (nothing
    is downloaded): real shapes, chat template and image settings, random weights. For
    measuring cost (time, memory, bytes) at real size; never accuracy. Without NAME: the list.

    \b
    Example:
      edgeqtl zoo llava-interleave-qwen-0.5b --out ckpt/interleave
      edgeqtl export --model ckpt/interleave --bits 2 --target arm64 --out bundles/interleave
    """
    from edgeqtl.models import zoo as models_zoo

    if name is None:
        click.echo("\n".join(models_zoo.names()))
        return
    if name not in models_zoo.names():
        raise UserError(f"unknown model {name!r}; known: {', '.join(models_zoo.names())}")
    if out is None:
        raise UserError("--out DIR is required to write a checkpoint")
    from edgeqtl.memory import peak_rss_mb

    path = models_zoo.build(name, out, scale)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    click.echo(f"{name} (scale {scale:g}) -> {path}: {size / 2**30:.2f} GiB, peak RSS {peak_rss_mb():.0f} MB")


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A TinyLLaVA Factory checkpoint directory (config.json model_type 'tinyllava').")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the Llava checkpoint to.")
@user_errors
def convert(model_dir, out):
    """Convert a TinyLLaVA Factory checkpoint into a Llava one that every edgeqtl command
    loads, without running its remote code: weights renamed, the -200 image placeholder
    made a real <image> token, its prompt written as a chat template (docs/MODELS.md).

    \b
    Example:
      edgeqtl convert --model ckpt/TinyLLaVA-Qwen2-0.5B-SigLIP --out ckpt/tinyllava-llava
      edgeqtl export --model ckpt/tinyllava-llava --cut 0 --bits 2 --out bundles/tinyllava
    """
    from edgeqtl.models.families.tinyllava import ConvertError, convert as convert_checkpoint

    try:
        path = convert_checkpoint(model_dir, out)
    except ConvertError as e:
        raise UserError(str(e)) from None
    click.echo(f"{model_dir} -> {path} (a Llava checkpoint)")


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model (its quantizer's input is measured), or a plain checkpoint.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Images like the device's: a folder of images or a LLaVA data file (default: the model's world).")
@click.option("--samples", type=click.IntRange(4), default=128, show_default=True,
              help="Questions the client half runs on (half fit the entropy model, half measure it).")
@click.option("--target-bits", type=click.FloatRange(0, min_open=True), default=None,
              help="Recommend the least distortion within this many bits per element on the wire (default 2).")
@click.option("--target-distortion", type=click.FloatRange(0, min_open=True), default=None,
              help="Instead: recommend the fewest bits whose relative MSE is at most this.")
@click.option("--levels", "level_range", default="2-16", show_default=True, help="Level counts to measure: A-B.")
@click.option("--clip-sigmas", type=click.FloatRange(0, min_open=True), default=None,
              help="One clip range for every L (default: each L's own, as the quantizer uses).")
@click.option("--prompt-ids/--prompt-codes", "prompt_ids", default=None,
              help="At cut 0 (the default there) only the image positions go up as codes, and only they are "
                   "measured.")
@click.option("--token-fractions", default="1,0.5,0.25,0.125,0.0625", show_default=True,
              help="Bytes per question against K: these fractions of each image's tokens, at the trained levels "
                   "(empty: skip).")
@click.option("--reducer", type=click.Choice(REDUCER_CHOICES), default="divprune",
              show_default=True, help="How K of the image's tokens are chosen for that table.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for calibration.json and calibration.png.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@user_errors
def calibrate(model_dir, data, samples, target_bits, target_distortion, level_range, clip_sigmas, prompt_ids,
              token_fractions, reducer, batch_size, out, threads):
    """Choose the number of quantizer levels from measured rate and distortion: for each
    L, the distortion after the quantizer, the codes' entropy, the bytes the rANS coder
    really sends (headers included) and the Gaussian bound; a recommendation for a
    target rate or distortion (docs/RATE.md).

    \b
    Example:
      edgeqtl calibrate --model runs/tiny-2bit --out runs/calib --target-bits 1.5
      edgeqtl calibrate --model runs/mine --data data/mine.jsonl --target-distortion 0.05 --out runs/calib-mine
    """
    from tqdm import tqdm

    from edgeqtl.export.calibration import user_samples, world_samples
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.load import load_prompts, load_split_model, world_of
    from edgeqtl.models.rate import bytes_against_tokens, calibrate as run, plot

    if target_bits is not None and target_distortion is not None:
        raise UserError("give --target-bits or --target-distortion, not both")
    try:
        lo, hi = (int(x) for x in level_range.split("-"))
    except ValueError:
        raise UserError(f"--levels is A-B (e.g. 2-16), got {level_range!r}") from None
    if not 2 <= lo <= hi <= 256:
        raise UserError(f"--levels must lie within 2-256, got {level_range}")
    set_threads(threads)
    model = load_split_model(model_dir).eval()
    if model.split.quantizer != "fsq":
        raise UserError(f"{model_dir} is a {model.split.quantizer} split: it has no quantizer to calibrate")
    if prompt_ids is None:
        prompt_ids = model.split.cut == 0
    if prompt_ids and model.split.cut != 0:
        raise UserError(f"--prompt-ids is for cut 0; this model is split at cut {model.split.cut}")
    prompts = load_prompts(model_dir, model)
    picked = user_samples(data, samples) if data is not None else \
        world_samples(samples, heldout=False, world=world_of(model_dir))
    bar = tqdm(total=len(picked), desc="client half", dynamic_ncols=True)
    cal = run(model, picked, prompts, image_spec_of(model), batch_size, prompt_ids, range(lo, hi + 1), clip_sigmas,
              target_bits, target_distortion, bar.update)
    try:
        fractions = [float(f) for f in token_fractions.split(",") if f.strip()]
    except ValueError:
        raise UserError(f"--token-fractions takes fractions such as 1,0.5,0.125; got {token_fractions!r}") from None
    if any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"--token-fractions must lie in (0, 1]; got {token_fractions!r}")
    half = len(picked) // 2
    per_k = bytes_against_tokens(model, picked[:half], picked[half:], prompts, image_spec_of(model), prompt_ids,
                                 reducer, fractions, batch_size) if fractions else []
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(
        {**cal.to_dict(), "bytes_against_tokens": [dataclasses.asdict(r) for r in per_k]}, indent=2))
    plot(cal, out / "calibration.png")
    click.echo(f"{cal.samples} samples, {cal.elements:,} code elements ({cal.code_dim} per position)"
               f"{'; image positions only (prompt ids)' if prompt_ids else ''}; the model was trained at "
               f"{cal.trained_levels} levels")
    click.echo(f"{'L':>3} {'clip':>5} {'rel MSE':>9} {'cosine':>7} {'entropy':>8} {'model':>7} {'rANS':>7} "
               f"{'wire':>7} {'packed':>7} {'bound@wire':>10}")
    for r in cal.rows:
        mark = "  <- recommended" if r.levels == cal.recommended else ""
        click.echo(f"{r.levels:>3} {r.clip_sigmas:>5.2f} {r.distortion:>9.4f} {r.cosine:>7.4f} {r.entropy_bits:>8.3f} "
                   f"{r.model_bits:>7.3f} {r.rans_payload_bits:>7.3f} {r.wire_bits:>7.3f} {r.packed_bits:>7.3f} "
                   f"{r.bound_distortion:>10.4f}{mark}")
    click.echo("bits per element: entropy, empirical; model, under the fitted entropy model; rANS, the coder's "
               "payload; wire, frames per question with headers (packing where smaller). rel MSE: of the "
               "standardised signal, after the best gain per dimension")
    if per_k:
        click.echo(f"\nbytes per question against K (image tokens kept, --reducer {reducer}), at the trained "
                   f"{model.split.levels} levels, headers included; 16-bit: the same prompts' hidden states with every "
                   "image token")
        click.echo(f"{'K':>5} {'positions':>9} {'packed B':>9} {'rANS B':>9} {'16-bit B':>10} {'vs 16-bit':>9}")
        for r in per_k:
            if r.note:
                click.echo(f"{r.tokens:>5}  {r.note}")
                continue
            click.echo(f"{r.tokens:>5} {r.positions:>9.1f} {r.packed:>9,.0f} {r.rans:>9,.0f} {r.fp16:>10,.0f} "
                       f"{100 * (1 - r.rans / r.fp16):>8.2f}%")
    click.echo(f"wrote {out / 'calibration.json'} and {out / 'calibration.png'}")
