"""`edgeqtl demo`: the whole chain on this machine (edgeqtl/demo.py)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/edgeqtl-demo"), show_default=True,
              help="Where the trained model and the bundle are cached between runs.")
@click.option("--steps", type=int, default=2000, show_default=True,
              help="Training steps when no trained model is cached (5500 reaches the benchmark's accuracy).")
@click.option("--questions", type=int, default=100, show_default=True, help="Held-out questions to ask.")
@click.option("--retrain", is_flag=True, help="Train again even if a model is cached.")
@user_errors
def demo(workdir, steps, questions, retrain):
    """End to end on this machine: train the tiny model (if not cached), export a
    bundle, start a broker, a server agent and a device agent, and ask questions.

    The tiny model knows only the shapes world: 64x64 black images with up to four
    coloured shapes on a 2x2 grid (the demo saves one of its questions' images to look at).

    \b
    Example:
      edgeqtl demo
      edgeqtl demo --steps 5500 --retrain     # the full recipe (~12 min on 2 cores)
    """
    from edgeqtl.demo import run_demo

    run_demo(workdir, steps, questions, retrain, echo=click.echo)
