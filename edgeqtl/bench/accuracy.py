"""The `accuracy` suite: held-out accuracy against bits per element.

Without --model: the preset trained from scratch at each width (16-bit baseline, 2 bits,
1 bit; the full run adds 3 levels, log2(3) = 1.58 bits), same recipe and seed, on its
world; the held-out set per family. With --model: that model alone (on --data if given),
as one point against the width it was trained at.
"""
from __future__ import annotations

import math

from . import fixtures
from .report import BenchContext, Section, markdown_table, new_figure, save_figure

TITLE = "Accuracy against bits per element"

FULL_LEVELS = (None, 4, 3, 2)  # None: the 16-bit baseline
QUICK_LEVELS = (None, 4, 2)


def _evaluate(ctx: BenchContext, model_dir, per_family: int) -> dict:
    from edgeqtl.models import jobs
    from edgeqtl.models.load import load_prompts, load_split_model, world_of

    model = load_split_model(model_dir)
    prompts = load_prompts(model_dir, model)
    s = model.split
    bits = 16.0 if s.quantizer != "fsq" else math.log2(s.levels) * s.code_dim / model.hidden_size
    if ctx.data is not None and ctx.model is not None:
        opts = jobs.DataOptions(ctx.data, skip_bad=True)
        records = jobs.checked(ctx.data, opts, model, prompts, lambda line: None)
        if ctx.quick:
            records = records[:50]
        rep = jobs.eval_records(model, prompts, records, progress=ctx.progress).to_dict()
    else:
        rep = jobs.eval_world(model, prompts, per_family, world_of(model_dir)).to_dict()
    return {"model": str(model_dir), "quantizer": s.quantizer, "levels": s.levels if s.quantizer == "fsq" else None,
            "bits_per_element": bits, "accuracy": rep["accuracy"], "records": rep["records"],
            "per_category": {k: v["accuracy"] for k, v in rep["per_category"].items()}}


def run(ctx: BenchContext) -> Section:
    per_family = 20 if ctx.quick else 500
    if ctx.model is not None:
        runs = [_evaluate(ctx, ctx.model, per_family)]
    else:
        runs = []
        for levels in (QUICK_LEVELS if ctx.quick else FULL_LEVELS):
            model_dir = fixtures.trained_model(ctx, levels)
            runs.append(_evaluate(ctx, model_dir, per_family))
            ctx.echo(f"  {fixtures.run_name(levels)}: {100 * runs[-1]['accuracy']:.1f}% of {runs[-1]['records']}")
    base = next((r for r in runs if r["quantizer"] == "fp16"), None)
    for r in runs:
        r["points_below_16bit"] = None if base is None else 100 * (base["accuracy"] - r["accuracy"])

    cats = list(runs[0]["per_category"])
    header = ["quantizer", "bits/element", "accuracy", "vs 16-bit (points)"] + cats
    rows = [[r["quantizer"] if r["levels"] is None else f"fsq, {r['levels']} levels", r["bits_per_element"],
             f"{100 * r['accuracy']:.1f}%", "-" if r["points_below_16bit"] is None else f"{0.0 - r['points_below_16bit']:+.1f}"]
            + [f"{100 * r['per_category'].get(c, float('nan')):.1f}%" for c in cats] for r in runs]

    fig, ax = new_figure()
    xs = [r["bits_per_element"] for r in runs]
    ax.plot(xs, [100 * r["accuracy"] for r in runs], "o-", label="mean")
    for c in cats:
        ax.plot(xs, [100 * r["per_category"][c] for r in runs], ".--", alpha=0.6, label=c)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload bits per element at the cut")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy against bits")
    ax.legend(fontsize=7, ncol=2)
    plot = save_figure(fig, ctx.path("accuracy.png"))

    source = (f"{ctx.data} (the first {runs[0]['records']} good records)" if ctx.data is not None and ctx.model
              else f"the held-out set of its world, {per_family} questions per family")
    what = (f"`{ctx.model}`" if ctx.model is not None else
            f"the {ctx.preset} preset trained from scratch at each width with the same recipe and seed "
            f"({'quick: ' + str(fixtures.QUICK_TRAIN['steps']) + ' steps' if ctx.quick else 'its default recipe'})")
    markdown = (f"Model: {what}. Questions: {source}; greedy first answer word (built-in world) or normalised "
                f"exact match (records).\n\n{markdown_table(header, rows)}\n\n![accuracy against bits]({plot.name})\n\n"
                "Bits per element are the payload's (codes per position times log2 of the levels, over the hidden "
                "size); the `wire` suite counts the frames' headers too.")
    headline = [(f"accuracy at {r['bits_per_element']:.2g} bits/element", f"{100 * r['accuracy']:.1f}%") for r in runs]
    return Section("accuracy", TITLE, markdown, {"runs": runs, "per_family": per_family}, [plot], headline)
