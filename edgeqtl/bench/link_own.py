"""The `link` suite on a user's own bundle (`edgeqtl bench link --bundle B` or `--model M`,
with `--data` for the questions): time per answer over each emulated link, split into
device, transfer and server, for the frames that bundle sends (packed and, where it has
an entropy model, entropy-coded), measured end to end exactly as link.py measures the
preset's models.

There is no 16-bit version of the user's model to ask, so the 16-bit comparison is of
transfer alone: payloads of the bundle's own frame sizes, and of the same prompts as
16-bit hidden states (what the device client counts for every question), through the
same relay to an MQTT echo, request to reply.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import fixtures
from .link import (HEADLINE_PROFILE, TITLE, TRANSFER_GOAL, _find, _measure_bundle, _measure_real_size,
                   _questions_per_profile, transfer_speedups)
from .report import BenchContext, Section, markdown_table, new_figure, save_figure


def frame_kinds(manifest) -> list[tuple[str, bool]]:
    """(label, entropy-coded) of what the bundle can send."""
    if manifest.quantizer != "fsq":
        return [("16-bit", False)]
    bits = f"{math.log2(manifest.levels):.3g}-bit"
    kinds = [(f"{bits} packed", False)]
    if manifest.entropy is not None:
        kinds.append((f"{bits} entropy-coded", True))
    return kinds


def run_own(ctx: BenchContext, profiles: list[str]) -> Section:
    from edgeqtl.bundle import BundleManifest
    from edgeqtl.link import PROFILES

    bundle = Path(ctx.bundle) if ctx.bundle is not None else fixtures.bundle_of(ctx, Path(ctx.model))
    manifest = BundleManifest.load(bundle)
    kinds = frame_kinds(manifest)
    most = max(_questions_per_profile(ctx, p) for p in profiles)
    qs = fixtures.questions(ctx, most)
    questions = {p: qs[:_questions_per_profile(ctx, p)] for p in profiles}
    ctx.echo(f"  link: {bundle} (cut {manifest.cut}), {', '.join(k for k, _ in kinds)}; {', '.join(profiles)}")
    rows = _measure_bundle(ctx, bundle, manifest.cut, kinds, profiles, questions)
    # The sizes the echo sends: the median frame a question sent, and the same prompts at 16 bits
    # (the median: the first timed question names the warm-up's image by digest, a small frame).
    sizes = {"16-bit": round(statistics.median(_per_question(rows, None, "bytes_up_16bit")))}
    sizes.update({k: round(statistics.median(_per_question(rows, k, "bytes_up"))) for k, _ in kinds if k != "16-bit"})
    ctx.echo("  link: the same frame sizes against 16-bit, transfer only")
    echo_rows = _measure_real_size(ctx, profiles, sizes)
    head = _headline(echo_rows, [k for k, _ in kinds if k != "16-bit"])
    plots = [_plot(ctx, rows, profiles, [k for k, _ in kinds], bundle)]
    figures = {"bundle": str(bundle), "cut": manifest.cut, "levels": manifest.levels, "quantizer": manifest.quantizer,
               "questions": str(ctx.data) if ctx.data is not None else "the model's world, held out",
               "profiles": {p: PROFILES[p].describe() for p in profiles}, "rows": rows, "echo_rows": echo_rows,
               "sizes": sizes, "headline": head}
    return Section("link", TITLE, _markdown(ctx, bundle, manifest, rows, echo_rows, head, profiles, plots), figures,
                   plots, [(f"link, your bundle at {head['profile']}: {kind} transfer",
                            f"{h['transfer_ms']:.0f} ms against {h['transfer_ms_16bit']:.0f} ms at 16 bits "
                            f"({h['transfer_speedup']:.1f}x; goal >= {TRANSFER_GOAL:g}x)")
                           for kind, h in head["frames"].items()])


def _per_question(rows: list[dict], kind: str | None, key: str) -> list[float]:
    return [q[key] for r in rows if kind is None or r["frame"] == kind for q in r["per_question"]]


def _headline(echo_rows: list[dict], kinds: list[str]) -> dict:
    return {"profile": HEADLINE_PROFILE, "goal_transfer_speedup": TRANSFER_GOAL,
            "frames": transfer_speedups(echo_rows, kinds)}


def _plot(ctx: BenchContext, rows: list[dict], profiles: list[str], kinds: list[str], bundle: Path):
    colors = {"device": "#4c72b0", "transfer": "#dd8452", "server": "#55a868"}
    fig, _ = new_figure(max(6.4, 3.2 * len(profiles)), 4.0)
    fig.clear()
    axes = fig.subplots(1, len(profiles), squeeze=False)[0]
    for ax, profile in zip(axes, profiles):
        for b, kind in enumerate(kinds):
            r = _find(rows, profile, kind, rows[0]["cut"])
            bottom = 0.0
            for part in ("device", "transfer", "server"):
                ax.bar(b, r[f"{part}_ms"], 0.8, bottom=bottom, color=colors[part],
                       label=part if ax is axes[0] and b == 0 else None)
                bottom += r[f"{part}_ms"]
        ax.set_xticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_title(profile, fontsize=9)
    axes[0].set_ylabel("ms per answer (median of each part)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{bundle.name}: time per answer, device / transfer / server", fontsize=9)
    return save_figure(fig, ctx.path("link_split.png"))


def _markdown(ctx, bundle, manifest, rows, echo_rows, head, profiles, plots) -> str:
    from edgeqtl.link import PROFILES

    fmt = lambda v: f"{v:,.0f}"  # noqa: E731
    source = f"the first good records of {ctx.data}" if ctx.data is not None else "the model's held-out world"
    lines = [
        f"Your bundle `{bundle}` (cut {manifest.cut}, "
        f"{manifest.levels if manifest.quantizer == 'fsq' else 16} {'levels' if manifest.quantizer == 'fsq' else 'bits'}"
        f"), asked {source}, end to end through a shaped relay as in the preset's measurement: device compute "
        "(its ONNX graphs and frame building), server compute (the agent's batch handler), and the rest as "
        "transfer. Medians per part over each row's questions; one untimed warm-up; no retries.",
        "",
        "Links: " + "; ".join(PROFILES[p].describe() for p in profiles) + ".",
        "",
        markdown_table(["profile", "cut", "frame", "frame bytes up", "16-bit bytes up", "TCP bytes up",
                        "round trips", "device ms", "transfer ms", "server ms", "total ms"],
                       [[r["profile"], r["cut"], r["frame"], fmt(r["bytes_up"]), fmt(r["bytes_up_16bit"]),
                         fmt(r["tcp_bytes_up"]), f"{r['round_trips']:g}", r["device_ms"], r["transfer_ms"],
                         r["server_ms"], r["total_ms"]] for r in rows]),
        "",
        f"![time per answer]({plots[0].name})",
        "",
        "### Against 16-bit hidden states, transfer only",
        "",
        "No 16-bit version of your model was asked. These rows send payloads of your frames' sizes and of the same "
        "prompts at 16 bits through the same relay to an MQTT echo that replies at once; the time is request to "
        "reply, with no model.",
        "",
        markdown_table(["profile", "frame", "bytes up", "bytes down", "repeats", "transfer ms", "link model ms"],
                       [[r["profile"], r["frame"], fmt(r["bytes_up"]), fmt(r["bytes_down"]), r["repeats"],
                         r["transfer_ms"], r["link_model_ms"]] for r in echo_rows]),
        "",
        f"At {head['profile']}: " + ("; ".join(
            f"{kind} {h['transfer_ms']:.0f} ms against {h['transfer_ms_16bit']:.0f} ms at 16 bits "
            f"({h['transfer_speedup']:.2f}x, goal >= {TRANSFER_GOAL:g}x: {'met' if h['meets_goal'] else 'not met'})"
            for kind, h in head["frames"].items()) or "no codes to compare (a 16-bit bundle)") + ".",
    ]
    return "\n".join(lines)
