"""`edgeqtl bench`: one command, one report (report.md, with JSON and PNG plots beside it).

    accuracy  held-out accuracy against bits per element (16-bit, 4, 2, 1 bit)
    wire      uplink and downlink bytes per question and per training step, headers included
    client    the device half: ONNX Runtime fp32/int8 against PyTorch eager, latency and RSS
    link      time per answer over emulated links (NB-IoT .. Wi-Fi): device, transfer, server
    server    answers/s against the number of devices, batched against one at a time
    training  split training over MQTT against the same steps in one process
    privacy   what an eavesdropper or the server recovers from what is sent: image
              reconstructions (PSNR, SSIM) and attribute probes, 16-bit against codes

Each suite is a module here with TITLE and run(ctx) -> report.Section; torch is imported
inside the suites that need it, never at import. The registry checks itself below.
"""
from __future__ import annotations

import importlib
import time
import traceback

from .report import BenchContext, Section, write_report, write_section_json

SUITES = ("accuracy", "wire", "client", "link", "server", "training", "privacy")

_MODULES = {}
for _name in SUITES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    if not (isinstance(getattr(_module, "TITLE", None), str) and callable(getattr(_module, "run", None))):
        raise ImportError(f"edgeqtl.bench.{_name} must define TITLE (str) and run(ctx) -> Section")
    _MODULES[_name] = _module


def suite(name: str):
    try:
        return _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown bench suite {name!r}; the suites are {', '.join(SUITES)}") from None


def run_suites(ctx: BenchContext, names: list[str] | tuple[str, ...] = SUITES, keep_going: bool = True):
    """Run `names` in order; after each, its JSON and the whole report are written. A
    suite that fails is reported (in report.md, with its error) and, with keep_going,
    the others still run. Returns (sections, failures)."""
    modules = [suite(n) for n in names]  # every name checked before anything runs
    sections: list[Section] = []
    failed: dict[str, str] = {}
    for name, module in zip(names, modules):
        ctx.echo(f"[{name}] {module.TITLE}")
        t0 = time.time()
        try:
            section = module.run(ctx)
        except Exception as exc:  # one failing suite must not lose the others' figures
            failed[name] = f"{type(exc).__name__}: {exc}"
            (ctx.path(f"{name}.error.txt")).write_text(traceback.format_exc())
            ctx.echo(f"[{name}] failed: {failed[name]} (traceback in {ctx.out / (name + '.error.txt')})")
            if not keep_going:
                write_report(ctx, sections, failed)
                raise
        else:
            section.seconds = time.time() - t0
            sections.append(section)
            write_section_json(ctx, section)
            ctx.echo(f"[{name}] done in {section.seconds:.0f} s")
        write_report(ctx, sections, failed)
    return sections, failed
