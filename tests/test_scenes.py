"""The scenes benchmark: deterministic, answerable from the scene, balanced, tokenisable, fast."""
from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeqtl import scenes

PER_FAMILY = 60  # 420 held-out samples: a few hundred answers re-derived


@pytest.fixture(scope="module")
def held():
    return scenes.heldout(PER_FAMILY)


# --------------------------------------------------------------------------- determinism


def _digest(samples) -> list[tuple[bytes, str, str]]:
    return [(s.image.tobytes(), s.question, s.answer) for s in samples]


def test_training_batches_are_deterministic_per_seed_stream_and_step():
    a = scenes.train_batch(7, 3, 8)
    assert _digest(a) == _digest(scenes.train_batch(7, 3, 8))
    assert [s.scene for s in a] == [s.scene for s in scenes.train_batch(7, 3, 8)]
    for other in (scenes.train_batch(7, 4, 8), scenes.train_batch(8, 3, 8), scenes.train_batch(7, 3, 8, stream=2)):
        assert not any(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, other))
    assert Counter(s.family for s in scenes.train_batch(0, 0, 14)) == {f: 2 for f in scenes.FAMILIES}
    with pytest.raises(ValueError):
        scenes.train_batch(0, 0, 1, stream=0)  # the held-out set's stream


def test_heldout_is_fixed_and_distinct_from_training(held):
    assert Counter(s.family for s in held) == {f: PER_FAMILY for f in scenes.FAMILIES}
    small = scenes.heldout(2)  # a smaller held-out set is a prefix of each family's list
    prefix = [s for k in range(len(scenes.FAMILIES)) for s in held[k * PER_FAMILY:k * PER_FAMILY + 2]]
    assert _digest(small) == _digest(prefix)
    # The same in a fresh interpreter: nothing depends on what the process did before.
    # (That interpreter also checks that the world stays torch-free.)
    code = ("import hashlib, sys; from edgeqtl import scenes; h = hashlib.sha256(); "
            "[h.update(s.image.tobytes() + s.question.encode() + s.answer.encode()) for s in scenes.heldout(2)]; "
            "assert 'torch' not in sys.modules; print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    h = hashlib.sha256()
    for s in small:
        h.update(s.image.tobytes() + s.question.encode() + s.answer.encode())
    assert out.stdout.strip() == h.hexdigest()
    held_images = {s.image.tobytes() for s in held}
    for seed, step in ((0, 0), (scenes.HELDOUT_SEED, 0), (1, 5)):
        assert not any(s.image.tobytes() in held_images for s in scenes.train_batch(seed, step, 32))


def test_images_are_rgb_uint8_of_the_asked_size(held):
    assert all(s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8 for s in held[::25])
    small = scenes.make_sample(np.random.default_rng(0), "detail", image_size=64)
    assert small.image.shape == (64, 64, 3) and small.scene.image_size == 64


# --------------------------------------------------------------------------- answers, re-derived


def _by_name(scene):
    return {(o.color, o.shape): o for o in scene.objects}


def _superlative_target(word, group, margin):
    """The object `word` picks out of `group`, asserting the margin the generator promises."""
    if word is None:
        assert len(group) == 1, "an attribute that repeats needs a superlative"
        return group[0]
    key, pick_max, ratio_based = {
        "largest": (lambda o: o.size, True, True), "smallest": (lambda o: o.size, False, True),
        "leftmost": (lambda o: o.x, False, False), "rightmost": (lambda o: o.x, True, False),
        "topmost": (lambda o: o.y, False, False), "bottommost": (lambda o: o.y, True, False),
    }[word]
    ordered = sorted(group, key=key, reverse=pick_max)
    best, runner_up = ordered[0], ordered[1]
    if ratio_based:
        big, small = (best, runner_up) if pick_max else (runner_up, best)
        assert big.size >= scenes.SIZE_RATIO * small.size
    else:
        assert abs(key(best) - key(runner_up)) >= margin
    return best


def _derive(s) -> str:
    """The answer to s.question, computed here from s.scene alone."""
    q, objs = s.question, s.scene.objects
    names = _by_name(s.scene)
    margin = scenes.POSITION_MARGIN * s.scene.image_size
    supers = "|".join(scenes.SUPERLATIVES)
    if m := re.fullmatch(rf"what color is the (?:({supers}) )?(\w+) \?", q):
        return _superlative_target(m[1], [o for o in objs if o.shape == m[2]], margin).color
    if m := re.fullmatch(rf"what shape is the (?:({supers}) )?(\w+) object \?", q):
        return _superlative_target(m[1], [o for o in objs if o.color == m[2]], margin).shape
    if q == "how many objects are there ?":
        return scenes.COUNT_WORDS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) objects are there \?", q):
        return scenes.COUNT_WORDS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+) are there \?", q):
        shape = {v: k for k, v in scenes.PLURALS.items()}[m[1]]
        return scenes.COUNT_WORDS[sum(o.shape == shape for o in objs)]
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", q):
        return "yes" if (m[1], m[2]) in names else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", q):
        a, b = names[m[1], m[2]], names[m[4], m[5]]
        offset = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[m[3]]
        assert abs(offset) >= margin, "near-tie asked"
        return "yes" if offset > 0 else "no"
    if m := re.fullmatch(r"what color is the object nearest to the (\w+) (\w+) \?", q):
        a = names[m[1], m[2]]
        ranked = sorted((math.dist((a.x, a.y), (o.x, o.y)), i) for i, o in enumerate(objs) if o is not a)
        assert ranked[1][0] >= scenes.NEAREST_RATIO * ranked[0][0]
        return objs[ranked[0][1]].color
    if m := re.fullmatch(r"is the (\w+) (\w+) (bigger|smaller) than the (\w+) (\w+) \?", q):
        a, b = names[m[1], m[2]], names[m[4], m[5]]
        assert max(a.size, b.size) >= scenes.SIZE_RATIO * min(a.size, b.size), "near-tie asked"
        return "yes" if (a.size > b.size) == (m[3] == "bigger") else "no"
    if m := re.fullmatch(r"which is (bigger|smaller) , the (\w+) (\w+) or the (\w+) (\w+) \?", q):
        a, b = names[m[2], m[3]], names[m[4], m[5]]
        assert max(a.size, b.size) >= scenes.SIZE_RATIO * min(a.size, b.size), "near-tie asked"
        assert (a.color == b.color) != (a.shape == b.shape), "one word must tell them apart"
        winner = max(a, b, key=lambda o: o.size) if m[1] == "bigger" else min(a, b, key=lambda o: o.size)
        return winner.shape if a.color == b.color else winner.color
    if m := re.fullmatch(r"which digit is on the (\w+) (\w+) \?", q):
        return "zero one two three four five six seven eight nine".split()[names[m[1], m[2]].digit]
    raise AssertionError(f"unrecognised question: {q!r}")


def test_every_answer_follows_from_the_scene(held):
    for s in held:
        assert _derive(s) == s.answer, (s.family, s.question)


def test_ask_rederives_on_random_scenes():
    rng = np.random.default_rng(5)
    asked = 0
    while asked < 300:
        scene = scenes.random_scene(rng, scenes._random_pairs(rng, int(rng.integers(0, 8))))
        if scene is None:
            continue
        for family in scenes.FAMILIES:
            qa = scenes.ask(scene, family, rng)
            if qa is not None:
                asked += 1
                sample = scenes.Sample(np.zeros((1, 1, 3), np.uint8), qa[0], qa[1], family, scene)
                assert _derive(sample) == qa[1], qa


def test_scenes_are_well_formed(held):
    for s in held:
        objs = s.scene.objects
        assert len({(o.color, o.shape) for o in objs}) == len(objs), "a (colour, shape) pair repeats"
        assert len(objs) <= 9 and all(o.color in scenes.COLORS and o.shape in scenes.SHAPES for o in objs)
        assert all(o.digit is None or (0 <= o.digit <= 9 and o.shape in scenes.DIGIT_SHAPES) for o in objs)


def test_objects_stay_visible_and_sizes_are_what_is_drawn(held):
    """Every object keeps most of its area in view; `size` is the equivalent radius of
    what is drawn, so "bigger" in the scene is bigger in the image."""
    for s in held[::3]:
        masks = [scenes._mask(o, s.scene.image_size) for o in s.scene.objects]
        for i, o in enumerate(s.scene.objects):
            in_front = np.zeros_like(masks[i])
            for m in masks[i + 1:]:
                in_front |= m
            assert (masks[i] & in_front).sum() <= scenes.MAX_COVERED * masks[i].sum() + 1
            if o.size >= 12:  # smaller ones gain a larger share from rasterised edges
                assert masks[i].sum() == pytest.approx(o.area, rel=0.2)


# --------------------------------------------------------------------------- balance


def test_yes_no_families_are_balanced():
    rng = np.random.default_rng(11)
    answers = {f: Counter() for f in ("exist", "position", "size")}
    while sum(map(sum, (c.values() for c in answers.values()))) < 3 * 400:
        scene = scenes.random_scene(rng, scenes._random_pairs(rng, int(rng.integers(2, 7))))
        for family, counter in answers.items():
            qa = scenes.ask(scene, family, rng) if scene is not None else None
            if qa is not None and qa[1] in ("yes", "no"):
                counter[qa[1]] += 1
    for family, counter in answers.items():
        assert 0.42 <= counter["yes"] / sum(counter.values()) <= 0.58, (family, counter)


def test_counts_cover_zero_to_nine_evenly():
    rng = np.random.default_rng(3)
    answers = Counter(scenes.make_sample(rng, "count").answer for _ in range(200))
    assert set(answers) == set(scenes.COUNT_WORDS)
    assert min(answers.values()) >= 8, answers  # 20 expected each


def test_families_ask_their_own_kinds(held):
    fam = {f: [s for s in held if s.family == f] for f in scenes.FAMILIES}
    assert {s.answer for s in fam["colour"]} <= set(scenes.COLORS)
    assert {s.answer for s in fam["shape"]} <= set(scenes.SHAPES)
    assert {s.answer for s in fam["detail"]} <= set(scenes.DIGIT_WORDS)
    assert {s.answer for s in fam["exist"]} == {"yes", "no"}
    assert any("nearest" in s.question for s in fam["position"])
    assert any(s.question.startswith("which is") for s in fam["size"])
    assert any(s.question.split()[4] in scenes.SUPERLATIVES for s in fam["colour"])


# --------------------------------------------------------------------------- tokens and files


def test_every_question_and_answer_tokenises_without_unknowns(held, tmp_path):
    scenes.save_tokenizer(tmp_path, 64)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    unk, image = tok.token_to_id(scenes.UNK_TOKEN), tok.token_to_id(scenes.IMAGE_TOKEN)
    for s in held:
        ids = tok.encode(scenes.format_prompt(s.question, 64) + " " + s.answer).ids
        assert unk not in ids, s.question
        assert ids.count(image) == 64
        assert tok.id_to_token(ids[-1]) == s.answer  # answers are single tokens
    assert json.loads((tmp_path / "edgeqtl_chat.json").read_text())["image_token"] == scenes.IMAGE_TOKEN


def test_write_llava_records_parse_and_point_at_their_images(held, tmp_path):
    samples = held[::PER_FAMILY][:5]
    path = scenes.write_llava(samples, tmp_path / "out", name="val")
    records = json.loads(Path(path).read_text())
    assert len(records) == len(samples)
    for record, s in zip(records, samples):
        assert set(record) == {"id", "image", "conversations", "category"}
        assert record["category"] == s.family
        # the marker where the world's chat format puts the image (after the question)
        assert record["conversations"] == [{"from": "human", "value": f"{s.question} <image>"},
                                           {"from": "gpt", "value": s.answer}]
        image = Path(path).parent / record["image"]
        assert record["image"].startswith("images/") and image.exists()
        assert np.array_equal(np.asarray(Image.open(image)), s.image)
    assert len({r["id"] for r in records}) == len(records)


def test_write_examples_writes_one_image_per_family_and_a_grid(tmp_path):
    paths = scenes.write_examples(tmp_path)
    assert {p.name for p in paths} == {f"scenes-{f}.png" for f in scenes.FAMILIES} | {"scenes-grid.png"}
    assert all(Image.open(p).size[0] >= 128 for p in paths)


# --------------------------------------------------------------------------- offline and fast


def test_backgrounds_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a background tried to reach the network")

    monkeypatch.setitem(sys.modules, "pooch", None)  # `import pooch` now fails
    monkeypatch.setattr(socket.socket, "connect", no_network)
    scenes._load_source.cache_clear()
    try:
        for name in scenes.PHOTO_SOURCES + scenes.TEXTURE_SOURCES:
            img = scenes._load_source(name)
            assert min(img.size) >= 128 and img.mode == ("L" if name in scenes.TEXTURE_SOURCES else "RGB")
        rng = np.random.default_rng(0)
        assert all(scenes.background(rng).size == (128, 128) for _ in range(30))
    finally:
        scenes._load_source.cache_clear()  # reload outside the patch next time


def test_a_batch_of_64_generates_in_under_two_seconds():
    scenes.train_batch(0, 0, 8)  # loads fonts and background sources once
    start = time.perf_counter()
    scenes.train_batch(0, 1, 64)
    assert time.perf_counter() - start < 2.0
