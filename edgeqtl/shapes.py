"""The `shapes` benchmark: coloured shapes on a 2x2 grid, single-word answers.

Everything is generated from a seed with Pillow and numpy, so the benchmark needs
no download and is identical on every machine. Five task families:

    colour    what color is the {shape} ?                      -> red
    shape     what shape is the {color} object ?               -> circle
    count     how many objects are there ?                     -> three
    position  where is the {color} {shape} ?                   -> northwest
    relation  what color is the object {left of|...} the {shape} ?  -> blue

Every object in an image has its own colour and its own shape, so each question
names exactly one object. Images are IMAGE_SIZE x IMAGE_SIZE, one object per
occupied cell, with jittered size and position and a little background noise.

This module is torch-free: the device agent and the demo use it too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .prompt import USER, ChatFormat, PromptEncoder
from .vocab import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, prompt_encoder, word_tokenizer  # noqa: F401

IMAGE_SIZE = 64
GRID = 2  # 2x2 cells
CELL = IMAGE_SIZE // GRID

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COUNT_WORDS = ("one", "two", "three", "four")
CORNERS = {(0, 0): "northwest", (0, 1): "northeast", (1, 0): "southwest", (1, 1): "southeast"}
# relation word -> (row offset, col offset) from the named object to the asked one
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
FAMILIES = ("colour", "shape", "count", "position", "relation")

# The question first, then the image: with causal attention the image tokens then see
# the question (docs/TRAINING.md).
CHAT = ChatFormat(user="user : {text}", assistant=" assistant :", answer=" {text} </s>", image_first=False,
                  image_separator=" ")


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int
    col: int


@dataclasses.dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    question: str
    answer: str
    family: str
    objects: tuple[Obj, ...]


# --------------------------------------------------------------------------- drawing


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render(objects: tuple[Obj, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw objects into an RGB uint8 array, one per grid cell, with jitter and noise."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = rng.uniform(0.30, 0.42) * CELL
        slack = CELL / 2 - r - 1
        cx = o.col * CELL + CELL / 2 + rng.uniform(-slack, slack)
        cy = o.row * CELL + CELL / 2 + rng.uniform(-slack, slack)
        rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[o.color])
        _draw_shape(draw, o.shape, cx, cy, r, rgb)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(0, 24, size=arr.shape, dtype=np.int16)  # background grain
    return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- questions


def _random_objects(rng: np.random.Generator, n: int) -> tuple[Obj, ...]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    picked = rng.choice(len(cells), size=n, replace=False)
    colors = rng.choice(list(COLORS), size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    return tuple(Obj(str(colors[i]), str(shapes[i]), *cells[picked[i]]) for i in range(n))


def _question(rng: np.random.Generator, family: str, objects: tuple[Obj, ...]):
    """Return (question, answer) or None when this layout cannot pose the family."""
    o = objects[rng.integers(len(objects))]
    if family == "colour":
        return f"what color is the {o.shape} ?", o.color
    if family == "shape":
        return f"what shape is the {o.color} object ?", o.shape
    if family == "count":
        return "how many objects are there ?", COUNT_WORDS[len(objects) - 1]
    if family == "position":
        return f"where is the {o.color} {o.shape} ?", CORNERS[(o.row, o.col)]
    if family == "relation":
        by_cell = {(x.row, x.col): x for x in objects}
        options = []
        for a in objects:
            for word, (dr, dc) in RELATIONS.items():
                b = by_cell.get((a.row + dr, a.col + dc))
                if b is not None:
                    options.append((word, a, b))
        if not options:
            return None
        word, a, b = options[rng.integers(len(options))]
        return f"what color is the object {word} the {a.shape} ?", b.color
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_sample(rng: np.random.Generator, family: str, max_objects: int = GRID * GRID) -> Sample:
    """One question of `family` about an image of 1..max_objects objects (2.. for relation)."""
    while True:
        lo = 2 if family == "relation" else 1
        objects = _random_objects(rng, int(rng.integers(lo, max(lo, max_objects) + 1)))
        qa = _question(rng, family, objects)
        if qa is not None:
            return Sample(render(objects, rng), qa[0], qa[1], family, objects)


def train_batch(seed: int, step: int, batch_size: int, families: tuple[str, ...] = FAMILIES,
                stream: int = 1, max_objects: int = GRID * GRID) -> list[Sample]:
    """Training batch number `step` of stream `stream` for `seed`: deterministic, so a
    resumed run sees exactly the batches it would have seen. Families are balanced per
    batch. Streams 1 and up are for training; the held-out set uses stream 2 of its own seed."""
    rng = np.random.default_rng([seed, stream, step])
    return [make_sample(rng, families[(step * batch_size + i) % len(families)], max_objects)
            for i in range(batch_size)]


HELDOUT_SEED = 20261123  # its own stream: [HELDOUT_SEED, 2, k] never meets [seed, 1, step]


def heldout(per_family: int = 500, families: tuple[str, ...] = FAMILIES) -> list[Sample]:
    """The fixed held-out set: `per_family` questions per family, the same everywhere."""
    out = []
    for k, fam in enumerate(families):
        rng = np.random.default_rng([HELDOUT_SEED, 2, k])
        out.extend(make_sample(rng, fam) for _ in range(per_family))
    return out


# --------------------------------------------------------------------------- device shards


def family_mix(device_index: int, num_devices: int, alpha: float | None, seed: int) -> np.ndarray:
    """A device's family proportions for split training: uniform (IID, alpha None) or
    Dirichlet(alpha) (non-IID; smaller alpha, more skewed)."""
    if alpha is None:
        return np.full(len(FAMILIES), 1 / len(FAMILIES))
    rng = np.random.default_rng([seed, 7919, num_devices])
    return rng.dirichlet(np.full(len(FAMILIES), alpha), size=num_devices)[device_index]


def shard_batch(seed: int, device_index: int, step: int, batch_size: int, mix: np.ndarray,
                max_objects: int) -> list[Sample]:
    """Batch `step` of a device's shard: its own stream (no other device or the server
    ever sees these images), families by largest remainder of `mix`."""
    w = mix * batch_size
    counts = np.floor(w).astype(int)
    for i in np.argsort(-(w - counts))[: batch_size - counts.sum()]:
        counts[i] += 1
    fams = tuple(f for f, c in zip(FAMILIES, counts) for _ in range(c))
    return train_batch(seed, step, batch_size, families=fams, stream=100 + device_index, max_objects=max_objects)


# --------------------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    words = set("user : assistant ? what color is the shape object how many objects are there where".split())
    words |= set("of".split()) | {w for rel in RELATIONS for w in rel.split()}
    words |= set(COLORS) | set(SHAPES) | set(COUNT_WORDS) | set(CORNERS.values())
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer():
    """A word-level `tokenizers.Tokenizer` for the tiny preset, built locally."""
    return word_tokenizer(vocabulary())


def prompts(image_token_count: int, tokenizer=None) -> PromptEncoder:
    """The tiny preset's prompt encoder: this world's tokenizer and chat format."""
    return prompt_encoder(tokenizer or build_tokenizer(), image_token_count, CHAT)


def save_tokenizer(directory: str | Path, image_token_count: int) -> None:
    """Write tokenizer.json plus the chat settings beside it (edgeqtl_chat.json)."""
    prompts(image_token_count).save(directory)


def format_prompt(prompt: str, image_token_count: int) -> str:
    """The chat template applied to one question, the image placeholder expanded."""
    return CHAT.render([(USER, prompt)], IMAGE_TOKEN * image_token_count)[0]


def answer_word(text: str) -> str:
    """The first word of a generated answer, lower-cased: what accuracy compares."""
    parts = text.strip().lower().split()
    return parts[0] if parts else ""

