"""edgeqtl bench privacy: the suite's figures in quick mode on the tiny preset, and the
metrics it reports checked against scikit-image's own and the definition of PSNR."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeqtl import shapes


def _scores(originals, reconstructions):
    from edgeqtl.bench.privacy import reconstruction_scores

    return reconstruction_scores(originals, reconstructions)


def _images(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_psnr_of_a_perfect_reconstruction_is_infinite_or_huge():
    x = _images().astype(np.float64) / 255
    s = _scores(x, x.copy())
    assert np.all(s["psnr"] > 100)  # inf, as skimage gives for zero error
    assert np.allclose(s["ssim"], 1.0)


def test_psnr_and_ssim_match_skimage_on_uint8_and_the_definition():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    clean = _images()
    rng = np.random.default_rng(1)
    noisy = np.clip(clean.astype(np.int16) + rng.integers(-30, 31, size=clean.shape), 0, 255).astype(np.uint8)
    s = _scores(clean / 255.0, noisy / 255.0)
    for i in range(len(clean)):
        # skimage infers data_range 255 for uint8: the same images in [0, 1] must score the same
        assert s["psnr"][i] == pytest.approx(peak_signal_noise_ratio(clean[i], noisy[i]), abs=1e-6)
        assert s["ssim"][i] == pytest.approx(structural_similarity(clean[i], noisy[i], channel_axis=-1), abs=1e-4)
        mse = np.mean((clean[i] / 255.0 - noisy[i] / 255.0) ** 2)
        assert s["psnr"][i] == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-6)
    assert 10 < s["psnr"].mean() < 40 and np.all(s["ssim"] < 0.99)


def test_scores_refuse_mismatched_shapes():
    x = _images().astype(np.float64) / 255
    with pytest.raises(ValueError, match="one shape"):
        _scores(x, x[:, :16])


def test_shapes_token_labels_agree_with_the_training_probe():
    """One token per grid cell (the tiny preset): the probe's labels are CellProbe's targets."""
    from edgeqtl.bench.privacy import Images, attach_world_labels
    from edgeqtl.models.training import CellProbe

    samples = shapes.train_batch(5, 0, 12)
    s = Images(samples)
    assert attach_world_labels(shapes, (s,), side=shapes.GRID) is None
    colour, shape = CellProbe.targets(samples)
    assert np.array_equal(s.labels["colour"], colour.reshape(len(samples), -1).numpy())
    assert np.array_equal(s.labels["shape"], shape.reshape(len(samples), -1).numpy())
    # a finer token grid: each token takes the label of the cell its centre lies in
    attach_world_labels(shapes, (s,), side=4)
    grid = s.labels["colour"].reshape(len(samples), 4, 4)
    assert np.array_equal(grid[:, ::2, ::2], colour.numpy()) and np.array_equal(grid[:, 1::2, 1::2], colour.numpy())


def test_privacy_suite_quick(bench_quick):
    section, out = bench_quick("privacy")
    fig = section.figures
    cases = fig["cases"]
    assert {"16-bit", "2-bit"} <= set(cases)
    base = fig["mean_image_baseline"]
    assert math.isfinite(base["psnr"]) and -1 <= base["ssim"] <= 1
    for name in ("16-bit", "2-bit"):
        c = cases[name]
        assert math.isfinite(c["psnr"]) and 0 < c["psnr"] < 60, (name, c["psnr"])
        assert -1 <= c["ssim"] <= 1
        assert len(c["psnr_per_image"]) == fig["budget"]["heldout_images"]
        assert c["psnr"] == pytest.approx(np.mean(c["psnr_per_image"]))
        for attr in ("colour", "shape"):
            a = c["attributes"][attr]
            assert 0 <= a["accuracy"] <= 1 and 0 < a["chance"] < 1, (name, attr, a)
            assert 0 <= a["object_accuracy"] <= 1 and 0 < a["object_chance"] < 1
    # The attacker learns from the 16-bit states: better than predicting the mean image,
    # and colour far above chance (the tiny preset's first stage trains the cut to carry it).
    assert cases["16-bit"]["psnr"] > base["psnr"] + 1
    assert cases["16-bit"]["attributes"]["colour"]["accuracy"] > cases["16-bit"]["attributes"]["colour"]["chance"] + 0.2

    gap = fig["gap_16_vs_2bit"]
    assert gap["db"] == pytest.approx(cases["16-bit"]["psnr"] - cases["2-bit"]["psnr"])
    assert gap["goal_db"] == 3 and gap["met"] == (gap["db"] >= 3)
    md = section.markdown
    assert "at least 3 dB" in md and f"{gap['db']:.2f} dB" in md and ("not met" in md) == (not gap["met"])
    assert "chance" in md and "mean image" in md

    entropy = fig["entropy_coded"]
    assert entropy["case"] == "2-bit" and entropy["frames"] > 0 and entropy["exact"] == entropy["frames"]
    assert "lossless" in md and "Not measured" in md

    assert len(section.plots) == 2
    for p in section.plots:
        assert p.parent == out and p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.name in md
    saved = json.loads((out / "privacy.json").read_text())
    assert saved["figures"]["gap_16_vs_2bit"]["db"] == pytest.approx(gap["db"])
    assert section.headline and "3 dB" in section.headline[0][0]
