"""`edgeqtl data`: users' data files (LLaVA conversation records, edgeqtl/data.py) and
the built-in worlds written out as such files. Torch-free."""
from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors

WORLDS = ("shapes", "scenes")  # edgeqtl.worlds


@click.group()
def data():
    """Data files: check one, or write a built-in world as one."""


@data.command("export")
@click.option("--world", type=click.Choice(WORLDS), default="shapes", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--train-samples", type=int, default=20000, show_default=True,
              help="Samples of the training stream to write (train.json).")
@click.option("--heldout-per-family", type=int, default=100, show_default=True,
              help="Held-out questions per family (heldout.json): the same set `edgeqtl eval` uses.")
@click.option("--seed", type=int, default=0, show_default=True, help="The training stream's seed.")
@user_errors
def export_world(world, out, train_samples, heldout_per_family, seed):
    """Write a built-in world as LLaVA records with PNG images: train.json (a sample of
    its training stream) and heldout.json (its fixed held-out set), so that every
    --data path can be checked against the built-in one.

    \b
    Example:
      edgeqtl data export --world shapes --out data/shapes
      edgeqtl train --preset tiny --data data/shapes/train.json --eval-data data/shapes/heldout.json --out runs/t
      edgeqtl data export --world scenes --out data/scenes --train-samples 50000
    """
    from tqdm import tqdm

    from edgeqtl import data as records
    from edgeqtl.worlds import get_world

    source = get_world(world)
    batch = 256
    samples = []
    for step in tqdm(range(-(-train_samples // batch)), desc="generate", dynamic_ncols=True):
        samples += source.train_batch(seed, step, batch)
    first = source.CHAT.image_first
    train = records.write_samples(samples[:train_samples], out, "train", image_first=first)
    heldout = records.write_samples(source.heldout(heldout_per_family), out, "heldout", image_first=first)
    click.echo(f"wrote {train} ({train_samples} records) and {heldout} "
               f"({heldout_per_family * len(source.FAMILIES)} records), images in {out / 'images'}")


@data.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Resolve relative image paths here instead of beside the data file.")
@user_errors
def check(file, image_root):
    """Check a data file as training would: every record's structure and image. Prints
    one line per bad record; exits 1 if any.

    \b
    Example:
      edgeqtl data check data/mine.jsonl --image-root /data/images
    """
    from edgeqtl import data as records

    report = records.check_records(records.load_records(file, image_root), skip_bad=True)
    for line in report.faults:
        click.echo(line)
    click.echo(report.summary())
    if report.faults:
        raise SystemExit(1)
