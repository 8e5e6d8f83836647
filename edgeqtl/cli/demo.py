"""`edgeqtl demo`: the whole chain on this machine (edgeqtl/demo.py)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/edgeqtl-demo"), show_default=True,
              help="Where the trained model and the bundle are cached between runs.")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="tiny: the shapes world, minutes; small: the scenes world at 64 image tokens, about half "
                   "an hour to train on 2 cores.")
@click.option("--steps", type=int, default=None,
              help="Training steps when no trained model is cached (default: tiny 2000, small 1500; the tiny "
                   "preset reaches its benchmark's accuracy at 5500).")
@click.option("--questions", type=int, default=100, show_default=True, help="Held-out questions to ask.")
@click.option("--retrain", is_flag=True, help="Train again even if a model is cached.")
@user_errors
def demo(workdir, preset, steps, questions, retrain):
    """End to end on this machine: train a preset (if not cached), export a
    bundle, start a broker, a server agent and a device agent, and ask questions.

    The tiny model knows only the shapes world: 64x64 black images with up to four
    coloured shapes on a 2x2 grid; the small one the scenes world: 128 px, 0-9 objects over
    photographs and textures (the demo saves one of its questions' images to look at).

    \b
    Example:
      edgeqtl demo
      edgeqtl demo --steps 5500 --retrain     # the full recipe (~12 min on 2 cores)
      edgeqtl demo --preset small             # the harder world (~30 min on 2 cores)
    """
    from edgeqtl.demo import run_demo

    run_demo(workdir, steps, questions, retrain, echo=click.echo, preset=preset)
