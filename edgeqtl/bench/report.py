"""What every suite of `edgeqtl bench` produces, and the report that gathers them.

A suite is a module of edgeqtl.bench with TITLE (one line) and run(ctx) -> Section. It
writes its figures as plain JSON-able data, its plots as PNG files under ctx.out, and a
markdown section that a person reads top to bottom. `write_report` puts the sections, in
the order they ran, under one headline table into report.md; it is rewritten after every
suite, so an interrupted run leaves a report of what finished.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable


@dataclasses.dataclass
class BenchContext:
    """What a suite is asked to do and where to put it."""

    out: Path
    quick: bool = False
    model: Path | None = None  # a trained split model (edgeqtl train) or a plain Llava checkpoint
    bundle: Path | None = None  # a device bundle (edgeqtl export) of that model
    data: Path | None = None  # LLaVA records (edgeqtl data) to ask instead of the built-in world
    preset: str = "tiny"  # the built-in preset the suites train when no --model is given
    progress: bool = True
    echo: Callable[[str], None] = print

    def path(self, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / name

    def work(self, name: str) -> Path:
        """A cache directory for models and bundles the suites share (out/work/name)."""
        d = self.out / "work" / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclasses.dataclass
class Section:
    suite: str
    title: str
    markdown: str  # the section's body: what was run, tables, plots (relative links), caveats
    figures: dict  # JSON-able: everything the markdown states, and more
    plots: list[Path] = dataclasses.field(default_factory=list)
    headline: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (what, figure) rows
    seconds: float = 0.0


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def busy_machine_note(load_average: float, effect: str) -> list[str]:
    """Markdown lines for a run on a machine already busy with other work (load above its cores)."""
    import os

    cores = os.cpu_count() or 1
    if load_average <= cores:
        return []
    return ["", f"The machine was busy when this ran (load average {load_average:.1f} on {cores} cores): {effect}."]


def new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return fig, ax


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_section_json(ctx: BenchContext, section: Section) -> Path:
    path = ctx.path(f"{section.suite}.json")
    body = {"suite": section.suite, "title": section.title, "quick": ctx.quick, "seconds": section.seconds,
            "plots": [p.name for p in section.plots], "headline": section.headline, "figures": section.figures}
    path.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    return path


def _json_default(v):
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON-able: {type(v).__name__}")


def write_report(ctx: BenchContext, sections: list[Section], failed: dict[str, str] | None = None) -> Path:
    failed = failed or {}
    lines = ["# edgeqtl bench report", "",
             f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} ({platform.processor() or 'cpu'}), "
             f"{'quick mode (figures from short runs: for a smoke test, not for decisions)' if ctx.quick else 'full mode'}"
             f"; model: {ctx.model or f'the {ctx.preset} preset, trained here'}"
             f"{f'; bundle: {ctx.bundle}' if ctx.bundle else ''}{f'; data: {ctx.data}' if ctx.data else ''}.", ""]
    heads = [(s.suite, what, fig) for s in sections for what, fig in s.headline]
    if heads:
        lines += ["## Headline", "", markdown_table(["suite", "what", "figure"], [list(h) for h in heads]), ""]
    for name, why in failed.items():
        lines += [f"**{name} failed**: {why}", ""]
    for s in sections:
        lines += [f"## {s.title}", "", f"_suite `{s.suite}`, {s.seconds:.0f} s_", "", s.markdown.strip(), ""]
    path = ctx.path("report.md")
    path.write_text("\n".join(lines))
    return path
