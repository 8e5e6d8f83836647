"""`edgeqtl bench`: the benchmark suites and their report (edgeqtl/bench/)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import threads_option, user_errors

SUITE_NAMES = ("accuracy", "wire", "client", "link", "server", "training", "privacy")  # edgeqtl.bench.SUITES


@click.command()
@click.argument("suites", nargs=-1, type=click.Choice(SUITE_NAMES))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for report.md, one JSON per suite, the plots, and the models trained on the way.")
@click.option("--quick", is_flag=True, help="A few-minute smoke version: short trainings, few questions.")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="Without --model: the built-in preset the suites train and measure.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Your trained split model (edgeqtl train) instead of the preset.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Your exported bundle of --model (else it is exported here).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your LLaVA records to ask and to calibrate on, instead of the built-in world's.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@threads_option
@user_errors
def bench(suites, out, quick, preset, model_dir, bundle, data, quiet, threads):
    """Measure what a deployment gives up and gains, in one report: accuracy against bits,
    bytes on the wire, the device half's speed and memory, time per answer over emulated
    links, server throughput, split training, and what the server or an eavesdropper can
    recover of an image from what is sent. With no SUITES, all of them, in that order.

    \b
    Example:
      edgeqtl bench --quick --out runs/bench-quick          # minutes: a smoke test
      edgeqtl bench --out runs/bench                        # the full report (hours on 2 cores)
      edgeqtl bench link privacy --model runs/mine --data mine/test.jsonl --out runs/bench-mine
    """
    from edgeqtl.bench import SUITES, run_suites
    from edgeqtl.bench.report import BenchContext

    from .common import set_threads

    assert SUITES == SUITE_NAMES, "cli/bench.py lists the suites of edgeqtl.bench"
    if bundle is not None and model_dir is None:
        raise click.UsageError("--bundle needs the --model it was exported from")
    set_threads(threads)
    ctx = BenchContext(out=out, quick=quick, model=model_dir, bundle=bundle, data=data, preset=preset,
                       progress=not quiet, echo=click.echo)
    _, failed = run_suites(ctx, list(suites) or list(SUITES))
    click.echo(f"report: {out / 'report.md'}")
    if failed:
        raise click.ClickException(f"{len(failed)} suite(s) failed: {', '.join(failed)} (see the report)")
