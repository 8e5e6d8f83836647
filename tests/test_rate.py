"""`edgeqtl calibrate`: rate and distortion per level count, measured with the real coder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeqtl.cli import main
from edgeqtl.wire import ImageRef, json_part


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel

    d = tmp_path_factory.mktemp("rate") / "model"
    save_checkpoint(SplitModel(build_tiny(2), SplitConfig(cut=0, levels=4)), d)
    return d


def _calibrate(model, out, *extra, samples: int = 24):
    r = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--samples", str(samples), "--levels", "2-8",
                                  "--threads", "1", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "calibration.json").read_text()), r.output


def test_calibrate_writes_json_and_png_and_its_entropy_matches_the_coder(tiny_model, tmp_path):
    # 96 questions: the held-out half is 24,576 codes, so the coder's fixed ~24 bytes a payload weigh < 1%
    cal, output = _calibrate(tiny_model, tmp_path / "a", samples=96)
    assert (tmp_path / "a" / "calibration.png").stat().st_size > 10_000
    rows = cal["rows"]
    assert [r["levels"] for r in rows] == list(range(2, 9)) and "recommended" in output
    for r in rows:
        # the coder's payload against the ideal rate of the same model: within 2% from 1 bit a code up; below,
        # its lanes' fixed cost (about 1.5 bytes per 1024 codes, docs/PROTOCOL.md) is what is left, 0.03 bits
        gap = r["rans_payload_bits"] - r["model_bits"]
        assert 0 <= gap <= (0.02 * r["model_bits"] if r["model_bits"] >= 1 else 0.03), r
        assert r["entropy_bits"] <= r["model_bits"] + 1e-9  # a fitted model costs at least the empirical entropy
        assert r["wire_bits"] <= r["packed_bits"] + 1e-9  # the device falls back to packing where it is smaller
    distortion = [r["distortion"] for r in rows]
    assert all(a > b for a, b in zip(distortion, distortion[1:]))  # more levels, less distortion
    assert all(a < b for a, b in zip([r["entropy_bits"] for r in rows], [r["entropy_bits"] for r in rows][1:]))


def test_the_recommendation_follows_the_target(tiny_model, tmp_path):
    cal, _ = _calibrate(tiny_model, tmp_path / "a")
    rows = {r["levels"]: r for r in cal["rows"]}
    low, high = rows[3]["wire_bits"], rows[7]["wire_bits"]
    pick = [_calibrate(tiny_model, tmp_path / f"b{i}", "--target-bits", str(t))[0]["recommended"]
            for i, t in enumerate((low, high))]
    assert pick[0] <= 3 < pick[1] <= 7  # a larger budget buys more levels, never past it
    strict, loose = (_calibrate(tiny_model, tmp_path / f"c{i}", "--target-distortion", str(d))[0]["recommended"]
                     for i, d in enumerate((rows[6]["distortion"], rows[3]["distortion"])))
    assert strict == 6 and loose == 3 and loose < strict  # the fewest bits that reach it


def test_a_quantizer_free_model_is_refused(tmp_path):
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel

    save_checkpoint(SplitModel(build_tiny(2), SplitConfig(cut=0, quantizer="fp16")), tmp_path / "m")
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no quantizer" in r.output


def test_quantize_matches_the_encoder():
    import torch

    from edgeqtl.models.quantizer import normalise, to_codes
    from edgeqtl.models.rate import _standardise, quantize

    z = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32) * 3 + 1
    for levels, clip in ((4, 1.49), (7, 1.94), (2, 3.0)):
        ours = quantize(_standardise(z), levels, clip)[0]
        theirs = to_codes(normalise(torch.from_numpy(z), clip), levels).numpy()
        assert (ours != theirs).mean() < 0.01  # the same codes, but for values on a rounding edge


def test_the_rate_term_follows_the_entropy_and_its_gradients_flow():
    import torch

    from edgeqtl.models.quantizer import soft_rate_bits
    from edgeqtl.models.rate import empirical_entropy

    g = torch.Generator().manual_seed(0)
    spread = (torch.rand(4000, 8, generator=g) * 2 - 1).requires_grad_(True)  # all 4 levels used alike
    narrow = (torch.randn(4000, 8, generator=g) * 0.1).clamp(-1, 1)  # nearly all on the two middle levels
    wide, tight = soft_rate_bits(spread, 4), soft_rate_bits(narrow, 4)
    assert 1.9 < wide.item() <= 2.0 and tight.item() < 1.2
    for n, r in ((spread.detach(), wide), (narrow, tight)):  # close to the hard codes' entropy
        codes = torch.round((n + 1) * 1.5).to(torch.uint8).numpy()
        assert abs(r.item() - empirical_entropy(codes, 4)) < 0.15
    wide.backward()
    assert spread.grad is not None and spread.grad.abs().sum() > 0  # the rate term's gradients reach the values


def test_training_with_a_rate_weight_lowers_the_rate():
    import dataclasses

    from edgeqtl.models.presets import build_tiny, get_preset
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.training import train

    def rate_history(weight: float) -> list[float]:
        model = SplitModel(build_tiny(0), SplitConfig(cut=0, levels=4))
        cfg = dataclasses.replace(get_preset("tiny").train_config(), steps=30, vision_steps=0, batch_size=8,
                                  rate_weight=weight, curriculum_steps=0, warmup=5)
        hist = train(model, WorldSource.for_model(model, cfg), cfg, progress=False)
        return [h["rate_bits"] for h in hist if "rate_bits" in h]

    heavy = rate_history(2.0)
    assert len(heavy) == 30
    assert np.mean(heavy[-5:]) < np.mean(heavy[:5]) - 0.1  # the term pulls the codes' entropy down


def test_calibrate_reports_bytes_per_question_against_k(tiny_model, tmp_path):
    cal, output = _calibrate(tiny_model, tmp_path / "a", "--token-fractions", "1,0.5,0.25,0.125", samples=16)
    rows = cal["bytes_against_tokens"]
    assert [r["tokens"] for r in rows] == [4, 2, 1]  # the tiny preset's 4 image tokens; 0.125 rounds to 1 again
    assert [r["positions"] for r in rows] == [4, 2, 1] and "bytes per question against K" in output
    # a reduced image says where its kept tokens sat: a map of the 4 positions, in the JSON options
    plain, placed = ImageRef(5, 2, "0" * 64), ImageRef(5, 2, "0" * 64, span=4, kept=(0, 3))
    position_map = len(json_part(placed.to_json()).payload) - len(json_part(plain.to_json()).payload)
    assert 0 < position_map < 32
    for a, b in zip(rows, rows[1:]):
        # one image token fewer: its 128 codes at 2 bits (32 B) and its prompt id (4 B) leave the frame
        saved = (a["tokens"] - b["tokens"]) * (128 * 2 // 8 + 4) - (position_map if a["tokens"] == 4 else 0)
        assert a["packed"] - b["packed"] == pytest.approx(saved)
        assert a["fp16"] == b["fp16"]  # the 16-bit reference keeps every image token
    assert all(r["rans"] <= r["packed"] for r in rows)
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_model), "--token-fractions", "2", "--out",
                                  str(tmp_path / "b")])
    assert r.exit_code != 0 and "--token-fractions must lie in (0, 1]" in r.output
