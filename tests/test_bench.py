"""`edgeqtl bench`: the registry, the report, the command, and the accuracy and wire
suites in quick mode (the other suites have their own test files)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeqtl.bench import SUITES, run_suites, suite
from edgeqtl.bench.report import BenchContext, Section, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_registry_names_every_suite_and_refuses_unknown_ones():
    assert SUITES == ("accuracy", "wire", "client", "link", "server", "training", "privacy")
    for name in SUITES:
        assert suite(name).TITLE
    with pytest.raises(ValueError, match="unknown bench suite 'speed'"):
        suite("speed")


def test_importing_the_bench_package_does_not_import_torch():
    code = "import sys, edgeqtl.bench, edgeqtl.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_failing_suite_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import edgeqtl.bench as bench

    def boom(ctx):
        raise RuntimeError("no broker here")

    def fine(ctx):
        return Section("wire", "Fine", "all good", {"x": 1}, [], [("x", "1")])

    monkeypatch.setattr(bench.suite("accuracy"), "run", boom)
    monkeypatch.setattr(bench.suite("wire"), "run", fine)
    ctx = BenchContext(out=tmp_path, quick=True, echo=lambda line: None)
    sections, failed = run_suites(ctx, ["accuracy", "wire"])
    assert [s.suite for s in sections] == ["wire"] and "no broker here" in failed["accuracy"]
    report = (tmp_path / "report.md").read_text()
    assert "accuracy failed" in report and "RuntimeError: no broker here" in report and "## Fine" in report
    assert "Traceback" in (tmp_path / "accuracy.error.txt").read_text()
    assert json.loads((tmp_path / "wire.json").read_text())["figures"] == {"x": 1}


def test_report_puts_the_headlines_first(tmp_path):
    ctx = BenchContext(out=tmp_path, quick=True)
    a = Section("accuracy", "A", "body a", {}, [], [("acc", "90%")])
    b = Section("wire", "B", "body b", {}, [], [("bytes", "500 B")])
    text = write_report(ctx, [a, b]).read_text()
    assert text.index("## Headline") < text.index("| accuracy | acc | 90% |") < text.index("## A") < text.index("## B")


def test_cli_checks_its_options_and_lists_the_suites():
    from edgeqtl.cli import main

    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "privacy" in r.output
    r = CliRunner().invoke(main, ["bench", "speed", "--out", "x"])
    assert r.exit_code == 2 and "speed" in r.output
    r = CliRunner().invoke(main, ["bench", "--out", "x", "--bundle", "."])
    assert r.exit_code == 2 and "--bundle needs the --model" in r.output
    r = CliRunner().invoke(main, ["link", "--help"])
    assert r.exit_code == 0 and "--delay" in r.output and "4g" in r.output


def test_accuracy_suite_quick(bench_quick):
    section, out = bench_quick("accuracy")
    runs = section.figures["runs"]
    assert [r["quantizer"] for r in runs] == ["fp16", "fsq", "fsq"]
    assert [r["bits_per_element"] for r in runs] == [16.0, 2.0, 1.0]  # the tiny preset sends all hidden dims
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and r["records"] == 100
        assert math.isclose(r["accuracy"], sum(r["per_category"].values()) / len(r["per_category"]))
    assert runs[0]["points_below_16bit"] == 0
    body = json.loads((out / "accuracy.json").read_text())
    assert body["suite"] == "accuracy" and body["plots"] == ["accuracy.png"]
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    assert "accuracy.png" in section.markdown and f"{100 * runs[1]['accuracy']:.1f}%" in section.markdown


def test_wire_suite_quick(bench_quick):
    section, out = bench_quick("wire")
    q = {r["frames"]: r for r in section.figures["per_question"]}
    assert set(q) == {"packed", "entropy-coded", "packed, prompt as codes", "16-bit"}
    # with the prompt as codes, 2-bit packing is 1/8 of the 16-bit payload; headers keep the frames a little above it
    assert 0.125 < q["packed, prompt as codes"]["bytes_up"] / q["16-bit"]["bytes_up"] < 0.2
    # prompt ids (cut 0, the default) send 4 bytes an id where a position's codes cost code_dim / 4
    assert q["packed"]["prompt_ids"] and q["packed"]["bytes_up"] < q["packed, prompt as codes"]["bytes_up"]
    assert q["16-bit"]["bytes_up"] == q["16-bit"]["bytes_up_16bit"]
    assert abs(q["packed"]["bytes_up_16bit"] - q["16-bit"]["bytes_up"]) / q["16-bit"]["bytes_up"] < 0.02
    for r in q.values():  # TCP carries the frames plus MQTT's own bytes
        assert r["tcp_bytes_up"] > r["bytes_up"] and r["tcp_bytes_down"] > 0
        assert math.isclose(r["bits_per_element"], 8 * r["bytes_up"] / (r["positions"] * r["hidden_size"]))
    k = section.figures["against_image_tokens"]
    assert [r["tokens"] for r in k] == [4, 2, 1] and "against K" in section.markdown
    assert all(a["packed"] > b["packed"] and a["rans"] > b["rans"] for a, b in zip(k, k[1:]))
    # K = all, built in process as the device builds it (the image's digest included), is the frame it sent,
    # but for its device id ("bench-wire-packed", 9 characters longer than "device-0") and other questions
    assert 0 <= q["packed"]["bytes_up"] - k[0]["packed"] < 20, (q["packed"]["bytes_up"], k[0]["packed"])
    t = {r["gradient_codec"]: r for r in section.figures["per_training_step"]}
    assert t["int4"]["bytes_down"] < t["int8"]["bytes_down"] < t["fp16"]["bytes_down"]
    assert t["int8"]["bytes_up"] == t["fp16"]["bytes_up"]  # the codes go up the same way
    assert (out / "wire.png").read_bytes()[:8] == PNG
