"""`edgeqtl bench link --quick`: time per answer over emulated links, split into device,
transfer and server. Checks the figures' structure and the physics they must show, never
timings within tight bounds (the machine that runs this is shared)."""
from __future__ import annotations

import json

import pytest

from edgeqtl.bench.link import CUTS, FRAME_KINDS, QUICK_PROFILES, REAL_SIZE_BYTES_UP

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def link_section(bench_quick):
    return bench_quick("link")


def _row(rows, profile, frame, cut=0):
    found = [r for r in rows if r["profile"] == profile and r["frame"] == frame and r["cut"] == cut]
    assert len(found) == 1, (profile, frame, cut, len(found))
    return found[0]


def test_every_profile_frame_and_cut_is_measured_and_adds_up(link_section):
    section, _ = link_section
    rows = section.figures["rows"]
    assert len(rows) == len(QUICK_PROFILES) * len(FRAME_KINDS) * len(CUTS)
    for profile in QUICK_PROFILES:
        for cut in CUTS:
            for frame in FRAME_KINDS:
                r = _row(rows, profile, frame, cut)
                for part in ("device_ms", "transfer_ms", "server_ms", "total_ms"):
                    assert r[part] > 0, (profile, frame, cut, part, r[part])
                assert r["device_ms"] + r["transfer_ms"] + r["server_ms"] == pytest.approx(r["total_ms"], abs=0.01)
                for q in r["per_question"]:  # each question's split adds up to its wall time too
                    assert q["device_s"] + q["transfer_s"] + q["server_s"] == pytest.approx(q["total_s"], abs=1e-6)
                # a question crosses the link at least once each way: one round trip of delay at least
                delay_ms = 1e3 * section.figures["profiles"][profile]["delay"]
                assert r["measured_total_ms"] >= 2 * delay_ms * 0.9
                assert r["tcp_bytes_up"] >= r["bytes_up"] > 0 and r["tcp_bytes_down"] > 0
            # cut 2: one round trip per generated token (answers of up to 4 tokens in quick mode)
            assert _row(rows, profile, "16-bit", 2)["round_trips"] >= 1
            assert _row(rows, profile, "16-bit", 0)["round_trips"] == 1


def test_two_bit_frames_are_smaller_than_16_bit(link_section):
    section, _ = link_section
    rows = section.figures["rows"]
    for profile in QUICK_PROFILES:
        for cut in CUTS:
            fp16 = _row(rows, profile, "16-bit", cut)
            for frame in FRAME_KINDS[1:]:
                r = _row(rows, profile, frame, cut)
                assert r["bytes_up"] < fp16["bytes_up"], (profile, cut, frame)
                assert r["bytes_up"] < r["bytes_up_16bit"]


def test_real_size_16_bit_frame_transfers_slower_than_2_bit_at_4g(link_section):
    section, _ = link_section
    real = section.figures["real_size_rows"]
    assert {r["bytes_up"] for r in real} == set(REAL_SIZE_BYTES_UP.values())
    fp16, packed = _row(real, "4g", "16-bit"), _row(real, "4g", "2-bit packed")
    ratio = fp16["transfer_ms"] / packed["transfer_ms"]
    # the bytes are 8x fewer; the round trip's delay and MQTT's overhead are common to both
    assert ratio > 2, ratio
    assert ratio < 1.5 * fp16["bytes_up"] / packed["bytes_up"], ratio
    # 1.5 MB at 10 Mbit/s is 1.24 s on the link alone: the relay shapes, it is not bypassed
    assert fp16["transfer_ms"] >= 0.9 * fp16["link_model_ms"]
    head = section.figures["headline"]["real_size"]["2-bit packed"]
    assert head["transfer_speedup"] == pytest.approx(ratio)


def test_plots_and_json_are_written(link_section):
    section, out = link_section
    assert section.plots
    for png in section.plots:
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, png
    body = json.loads((out / "link.json").read_text())  # the figures are JSON-able
    assert body["suite"] == "link" and len(body["figures"]["rows"]) == len(section.figures["rows"])
    assert "| profile | cut | frame |" in section.markdown
    assert "no model" in section.markdown and "does not" in section.markdown
    assert section.headline


def test_nothing_left_running(link_section):
    import threading
    import time

    def leftovers():
        # relays are "edgeqtl-link"; the suite's MQTT clients are all named bench-link-*
        return [t.name for t in threading.enumerate() if t.name == "edgeqtl-link" or "bench-link" in t.name]

    deadline = time.monotonic() + 5  # an endpoint's worker ends just after its stop() returns
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == []


def test_the_suite_measures_a_users_own_bundle_on_their_questions(link_section, tmp_path):
    """`edgeqtl bench link --bundle B --data F`: that bundle's own frames, asked the file's
    questions end to end, and the same frame sizes against 16-bit, transfer only."""
    import dataclasses

    from click.testing import CliRunner

    from edgeqtl.bench import fixtures
    from edgeqtl.bench import suite as bench_suite
    from edgeqtl.bench.report import BenchContext
    from edgeqtl.cli import main

    _, shared = link_section
    preset_ctx = BenchContext(out=shared, quick=True, progress=False, echo=lambda line: None)
    bundle = fixtures.bundle_of(preset_ctx, fixtures.trained_model(preset_ctx, 4, 0))  # the quick run's, cached
    r = CliRunner().invoke(main, ["data", "export", "--world", "shapes", "--out", str(tmp_path / "data"),
                                  "--train-samples", "1", "--heldout-per-family", "2"])
    assert r.exit_code == 0, r.output
    ctx = dataclasses.replace(preset_ctx, out=tmp_path / "own", bundle=bundle, data=tmp_path / "data" / "heldout.json")
    section = bench_suite("link").run(ctx)
    fig = section.figures
    assert fig["bundle"] == str(bundle) and fig["cut"] == 0
    kinds = {"2-bit packed", "2-bit entropy-coded"}
    assert {(r["profile"], r["frame"]) for r in fig["rows"]} == {(p, k) for p in QUICK_PROFILES for k in kinds}
    for row in fig["rows"]:
        assert row["device_ms"] > 0 and row["server_ms"] > 0 and row["bytes_up"] < row["bytes_up_16bit"]
        assert row["round_trips"] == 1  # cut 0, no resends: each row's client starts afresh
    assert {(r["profile"], r["frame"]) for r in fig["echo_rows"]} == \
        {(p, k) for p in QUICK_PROFILES for k in kinds | {"16-bit"}}
    import statistics

    for kind in kinds:  # the echo sends what the device sent: the median question's frame
        sent = [q["bytes_up"] for r in fig["rows"] if r["frame"] == kind for q in r["per_question"]]
        assert fig["sizes"][kind] == round(statistics.median(sent)) and fig["sizes"][kind] < fig["sizes"]["16-bit"]
    assert set(fig["headline"]["frames"]) == kinds and section.headline
    assert (tmp_path / "own" / "link_split.png").read_bytes()[:8] == PNG_MAGIC
    assert "Your bundle" in section.markdown
