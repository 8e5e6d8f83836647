"""`edgeqtl bench` client, server and training in quick mode on the tiny preset: figures
that are there, positive and consistent with each other, the plot, and a markdown section
that states them. No timing bounds: the machine is shared."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def cell(v: float) -> str:
    """A number as report.markdown_table writes it."""
    return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_common(section, out, name: str):
    assert section.suite == name and section.title
    assert json.loads(json.dumps(section.figures)) == section.figures  # plain JSON, no custom encoder needed
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["figures"] == section.figures and saved["plots"] == [f"{name}.png"]
    png = out / f"{name}.png"
    assert section.plots == [png]
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    assert f"]({name}.png)" in section.markdown
    assert section.headline and all(what and fig for what, fig in section.headline)


def test_client_suite(bench_quick):
    section, out = bench_quick("client")
    check_common(section, out, "client")
    f = section.figures
    rt = f["runtimes"]
    assert set(rt) == {"torch", "fp32", "int8"} and f["missing_variants"] == []
    for kind, r in rt.items():
        for key in ("median_ms", "p90_ms", "mean_ms", "peak_rss_mb", "rss_after_imports_mb"):
            assert positive(r[key]), (kind, key, r[key])
        assert r["p90_ms"] >= r["median_ms"] and r["runs"] == f["runs"] > 0
        assert r["peak_rss_mb"] >= r["rss_after_imports_mb"]
        assert r["latency_vs_torch"] == pytest.approx(r["median_ms"] / rt["torch"]["median_ms"], rel=1e-12)
        assert r["rss_vs_torch"] == pytest.approx(r["peak_rss_mb"] / rt["torch"]["peak_rss_mb"], rel=1e-12)
        assert cell(r["median_ms"]) in section.markdown and cell(r["peak_rss_mb"]) in section.markdown
        assert f"{r['latency_vs_torch']:.2f}x" in section.markdown
    # each runtime in its own process: only PyTorch's imported torch
    assert rt["torch"]["torch_imported"] and not rt["fp32"]["torch_imported"] and not rt["int8"]["torch_imported"]
    assert rt["torch"]["same_as_torch"] == 1.0 and rt["fp32"]["same_as_torch"] > 0.95  # the same half, exported
    assert f["wire_shape"][0] == 1 and f["quantizer"] == "fsq"
    heads = dict(section.headline)
    fp32_head = heads["ONNX Runtime fp32 latency vs PyTorch eager"]
    assert fp32_head.startswith(f"{rt['fp32']['latency_vs_torch']:.2f}x")
    assert any(f"{rt['int8']['peak_rss_mb']:.0f} MB" in fig for fig in heads.values())


def test_server_suite(bench_quick):
    section, out = bench_quick("server")
    check_common(section, out, "server")
    f = section.figures
    counts = f["device_counts"]
    assert counts == [1, 4] and f["largest_devices"] == 4 and set(f["runs"]) == {"1", "16"}
    for max_batch, run in f["runs"].items():
        assert run["max_batch"] == int(max_batch)
        for n in counts:
            r = run["by_devices"][str(n)]
            assert r["devices"] == n and r["answered"] == r["asked"] == n * f["per_device"]
            assert positive(r["seconds"]) and positive(r["answers_per_s"])
            assert r["answers_per_s"] == pytest.approx(r["answered"] / r["seconds"], rel=1e-12)
            assert positive(r["latency_median_ms"]) and r["latency_p90_ms"] >= r["latency_median_ms"]
            assert f["answers_per_s"]["one_at_a_time" if max_batch == "1" else "batched"][str(n)] == r["answers_per_s"]
            assert cell(r["answers_per_s"]) in section.markdown
        stats = run["server_stats"]  # what the server agent printed when it stopped
        assert stats["served"] == run["questions_sent"] and stats["duplicates"] == 0
        assert run["questions_sent"] == sum(n * f["per_device"] + n for n in counts)
    assert f["runs"]["1"]["mean_batch"] == 1.0  # --max-batch 1 never batches
    assert f["runs"]["16"]["mean_batch"] >= 1.0
    for n in counts:
        one, batched = f["answers_per_s"]["one_at_a_time"][str(n)], f["answers_per_s"]["batched"][str(n)]
        assert f["batched_vs_one"][str(n)] == pytest.approx(batched / one, rel=1e-12)
        assert f["same_answers"][str(n)] == n * f["per_device"]  # batching must not change an answer
    (what, fig), = section.headline
    assert "at 4 devices" in what
    assert fig.endswith(f"({f['batched_vs_one']['4']:.2f}x)") and f"{f['answers_per_s']['batched']['4']:.1f}" in fig


def test_training_suite(bench_quick):
    section, out = bench_quick("training")
    check_common(section, out, "training")
    f = section.figures
    steps = f["devices"] * f["steps_per_device"]
    assert f["devices"] == 2 and f["steps_per_device"] > 0
    for name in ("in_process", "mqtt"):
        r = f["runs"][name]
        assert r["steps"] == steps and r["device_steps"] == [f["steps_per_device"]] * 2
        assert r["applied"] == {"bench-train-0": f["steps_per_device"], "bench-train-1": f["steps_per_device"]}
        for key in ("seconds", "first_round_seconds", "seconds_per_step", "up_bytes_per_step", "down_bytes_per_step",
                    "up_fp16_bytes_per_step", "down_fp16_bytes_per_step"):
            assert positive(r[key]), (name, key, r[key])
        assert r["first_round_seconds"] < r["seconds"]
        # codes up and int8 gradients down: fewer bytes than 16-bit both ways
        assert r["up_bytes_per_step"] < r["up_fp16_bytes_per_step"]
        assert r["down_bytes_per_step"] < r["down_fp16_bytes_per_step"]
        assert len(r["losses"]) == steps and all(positive(v) for v in r["losses"])
        assert f"{1e3 * r['seconds_per_step']:.1f} ms" in section.markdown
    assert f["mqtt_vs_in_process_time"] == pytest.approx(
        f["runs"]["mqtt"]["seconds_per_step"] / f["runs"]["in_process"]["seconds_per_step"], rel=1e-12)
    m = f["match"]
    assert m["steps_compared"] == steps and m["applied_once"]
    # the same steps in the same order: over MQTT must give what one process gives
    assert m["same"] and max(m["max_loss_diff"], m["max_trunk_diff"], m["max_client_diff"]) <= f["match_tolerance"]
    assert f["runs"]["mqtt"]["losses"] == pytest.approx(f["runs"]["in_process"]["losses"], abs=f["match_tolerance"])
    assert "The results are the same" in section.markdown
    heads = dict(section.headline)
    assert heads["split training over MQTT gives the in-process results"].startswith("yes")
    assert heads["split training time per step, over MQTT vs in one process"].endswith(
        f"({f['mqtt_vs_in_process_time']:.2f}x)")


def test_suites_import_without_torch():
    code = ("import sys, edgeqtl.bench.client, edgeqtl.bench.server, edgeqtl.bench.training\n"
            "assert 'torch' not in sys.modules, 'a bench suite imports torch at import'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
