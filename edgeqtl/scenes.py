"""The `scenes` benchmark: several shapes on textured and photographic backgrounds.

A harder sibling of `edgeqtl.shapes`, with the same API so that the rest of the
project can swap worlds. Images are IMAGE_SIZE x IMAGE_SIZE (128 px): 0 to 9
objects at free positions, continuous sizes in three clearly different classes,
free rotations, some with a digit printed on them, over a crop of a photograph, a
tinted texture, a gradient, a noise texture or a plain colour (white and black
included). Answers are single words. Seven task families:

    colour    what color is the {shape} ?                        -> red
              what color is the largest {shape} ?   (when the shape repeats)
    shape     what shape is the {color} object ?                 -> star
    count     how many {objects | {color} objects | {shape}s} are there ?  -> zero .. nine
    exist     is there a {color} {shape} ?                       -> yes | no
    position  is the {color} {shape} {left of|right of|above|below} the {color} {shape} ?  -> yes | no
              what color is the object nearest to the {color} {shape} ?             -> blue
    size      is the {A} {bigger|smaller} than the {B} ?         -> yes | no
              which is {bigger|smaller} , the {A} or the {B} ?   -> the word that tells them apart
    detail    which digit is on the {color} {shape} ?            -> seven

Every (colour, shape) pair occurs at most once per image, so "the red star" names one
object. Every answer is computed from the scene description (`Scene`), never from
the pixels, and geometry questions are only asked with a margin (no near-ties).

Backgrounds use images that ship inside the scikit-image wheel (no pooch download).
This module is torch-free: the device agent and the demo may use it too.
"""
from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

# The chat pieces are shared with the shapes world, so a checkpoint's chat settings
# do not depend on which world trained it.
from edgeqtl.prompt import PromptEncoder
from edgeqtl.shapes import CHAT, answer_word, format_prompt
from edgeqtl.vocab import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, prompt_encoder, word_tokenizer

__all__ = [
    "IMAGE_SIZE", "COLORS", "SHAPES", "FAMILIES", "COUNT_WORDS", "DIGIT_WORDS", "SceneObject", "Scene", "Sample",
    "render", "random_scene", "ask", "make_sample", "train_batch", "train_stream", "heldout", "write_llava",
    "write_examples", "vocabulary", "build_tokenizer", "save_tokenizer", "prompts", "format_prompt",
    "answer_word", "CHAT", "IMAGE_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "EOS_TOKEN",
    "SPECIAL_TOKENS", "PHOTO_SOURCES", "TEXTURE_SOURCES", "TOKEN_LABELS", "token_labels",
]

IMAGE_SIZE = 128

# Saturated base colours whose hues sit far apart; each object is drawn with jitter.
COLORS = {
    "red": (225, 30, 30),
    "orange": (255, 135, 0),
    "yellow": (245, 220, 25),
    "green": (40, 190, 60),
    "cyan": (0, 205, 225),
    "blue": (35, 75, 235),
    "purple": (135, 45, 215),
    "magenta": (235, 45, 195),
}
COLOR_JITTER = 18  # per channel, out of 255
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_WORDS = COUNT_WORDS  # a digit is answered as its word, like a count: one token each
MAX_OBJECTS = len(COUNT_WORDS) - 1
FAMILIES = ("colour", "shape", "count", "exist", "position", "size", "detail")

# Object sizes are equivalent radii (the radius of the circle of the same area), as a
# fraction of the image side. The gaps between classes keep small/medium/large apart.
SIZE_CLASSES = {"small": (0.050, 0.070), "medium": (0.085, 0.110), "large": (0.135, 0.170)}
OUTLINE_RGB = (20, 20, 20)
OUTLINE_WIDTH = 0.011  # fraction of the image side: 1.4 px at 128
MAX_COVERED = 0.25  # the most of an object's area that objects in front of it may hide

# Margins below which a question is not asked (fractions of the image side or ratios).
POSITION_MARGIN = 0.06  # centres at least 7.7 px apart along the asked axis
SIZE_RATIO = 1.25  # equivalent radii (1.56 in area)
NEAREST_RATIO = 1.3  # second-nearest centre at least 1.3x as far as the nearest
RELATIONS = ("left of", "right of", "above", "below")
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")

# Images that ship inside the scikit-image wheel and load without pooch.
PHOTO_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
TEXTURE_SOURCES = ("brick", "grass", "gravel", "camera", "moon", "text")  # greyscale, tinted when used
# Left out on purpose: coins (its coins look like circles to count), colorwheel and
# retina (large saturated regions that compete with the object colours).


@dataclasses.dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    size: float  # equivalent radius in pixels: area = pi * size**2
    rotation: float  # degrees
    rgb: tuple[int, int, int]  # the jittered colour it is drawn in
    digit: int | None = None  # printed upright at the centre
    digit_px: float = 0.0  # font size of the digit, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        return math.pi * self.size ** 2


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in drawing order, back to front
    image_size: int = IMAGE_SIZE


@dataclasses.dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    question: str
    answer: str
    family: str
    scene: Scene


# --------------------------------------------------------------------------- geometry


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (k, 2) of the shape at rotation 0, pointing up; image y grows downwards."""
    def ring(n, start_deg, radii=(1.0,)):
        angles = np.deg2rad(start_deg + np.arange(n) * 360 / n)
        r = np.resize(np.asarray(radii), n)
        return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

    if shape == "triangle":
        return ring(3, -90)
    if shape == "square":
        return ring(4, 45)
    if shape == "diamond":  # a rhombus, not a rotated square: rotations stay unambiguous
        return np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], dtype=float)
    if shape == "hexagon":
        return ring(6, 0)
    if shape == "star":
        return ring(10, -90, radii=(1.0, 0.5))
    if shape == "cross":
        w = 0.4
        return np.array([(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
                         (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)], dtype=float)
    raise ValueError(f"{shape!r} has no polygon")


def _polygon_metrics(points: np.ndarray) -> tuple[float, float, float]:
    """(area, bounding radius, inradius about the centre) of a polygon around the origin."""
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    a, b = points, np.roll(points, -1, axis=0)
    t = np.clip(np.einsum("ij,ij->i", -a, b - a) / np.einsum("ij,ij->i", b - a, b - a), 0, 1)
    nearest = a + t[:, None] * (b - a)
    return float(area), float(np.max(np.hypot(x, y))), float(np.min(np.hypot(nearest[:, 0], nearest[:, 1])))


_UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _geometry(shape: str) -> tuple[float, float, float]:
    """For an object of equivalent radius 1: (polygon scale, bounding radius, inradius)."""
    if shape == "circle":
        return 1.0, 1.0, 1.0
    area, bound, inner = _polygon_metrics(_UNIT_POLYGONS[shape])
    scale = math.sqrt(math.pi / area)  # so that every shape of size s covers pi s^2
    return scale, bound * scale, inner * scale


_GEOMETRY = {s: _geometry(s) for s in SHAPES}
# Stars and crosses have too little room at the centre for a legible digit.
DIGIT_SHAPES = tuple(s for s in SHAPES if _GEOMETRY[s][2] >= 0.75)
# Digit ink height in px at 128: small against a 16 px patch, so that reading one
# takes fine detail, yet legible by eye.
DIGIT_HEIGHT = (7.0, 13.0)


def bounding_radius(obj: SceneObject) -> float:
    return _GEOMETRY[obj.shape][1] * obj.size


def _outline_points(obj: SceneObject, scale: float = 1.0) -> list[tuple[float, float]]:
    theta = math.radians(obj.rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = _UNIT_POLYGONS[obj.shape] @ rot.T * (_GEOMETRY[obj.shape][0] * obj.size)
    return [tuple(p) for p in ((pts + (obj.x, obj.y)) * scale).tolist()]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float, fill, outline=None, width: int = 0):
    if obj.shape == "circle":
        r = obj.size * scale
        cx, cy = obj.x * scale, obj.y * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_outline_points(obj, scale), fill=fill, outline=outline, width=width)


def _mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Boolean (H, W) footprint of the object, outline included."""
    img = Image.new("L", (image_size, image_size), 0)
    _draw_object(ImageDraw.Draw(img), obj, 1.0, fill=255)
    return np.asarray(img) > 0


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # Pillow's built-in scalable font


@functools.lru_cache(maxsize=None)
def _digit_ink(digit: int, px: int) -> tuple[float, float, float, float]:
    """Ink box (left, top, right, bottom) of the digit drawn at the origin, anchor 'lt'."""
    return tuple(float(v) for v in _font(px).getbbox(str(digit), anchor="lt"))


def _digit_box(obj: SceneObject, scale: float = 1.0) -> tuple[float, float, float, float]:
    """Where the digit's ink lies in the image, in pixels at `scale`: centred on the object."""
    l, t, r, b = _digit_ink(obj.digit, max(1, round(obj.digit_px * scale)))
    w, h = r - l, b - t
    cx, cy = obj.x * scale, obj.y * scale
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _digit_px(digit: int, inradius: float, ink_height: float) -> float:
    """The font size whose digit ink is `ink_height` px tall, shrunk until the ink box
    fits in the object's inscribed circle."""
    l, t, r, b = _digit_ink(digit, 100)
    px = ink_height * 100 / (b - t)
    while px > 4:
        l, t, r, b = _digit_ink(digit, round(px))
        if math.hypot(r - l, b - t) / 2 <= 0.92 * inradius:
            break
        px *= 0.92
    return px


def _digit_rgb(rgb) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (15, 15, 15) if luminance > 120 else (250, 250, 250)


# --------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=None)
def _load_source(name: str) -> Image.Image:
    """One scikit-image sample image, loaded once per process (RGB, or L for textures)."""
    import skimage.data  # imported here: only rendering needs it

    img = Image.fromarray(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8))
    return img.convert("L") if name in TEXTURE_SOURCES else img.convert("RGB")


def _random_rgb(rng: np.random.Generator, max_saturation: float, value=(0.1, 1.0)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, max_saturation), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def _crop(rng: np.random.Generator, src: Image.Image, size: int) -> Image.Image:
    w, h = src.size
    side = rng.uniform(0.25, 1.0) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    img = src.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _shift_colours(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Random hue rotation, damped saturation, scaled brightness."""
    h, s, v = (np.asarray(c, dtype=np.float32) for c in img.convert("HSV").split())
    h = (h + rng.uniform(0, 256)) % 256
    s = s * rng.uniform(0.2, 0.9)  # damped so that backgrounds never outshine the objects
    v = v * rng.uniform(0.55, 1.15)
    channels = [Image.fromarray(np.clip(c, 0, 255).astype(np.uint8)) for c in (h, s, v)]
    return Image.merge("HSV", channels).convert("RGB")


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    a = np.asarray(_random_rgb(rng, 0.6), np.float32)
    b = np.asarray(_random_rgb(rng, 0.6), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))


def _noise_texture(rng: np.random.Generator, size: int) -> Image.Image:
    cells = int(rng.integers(3, 17))
    base = np.asarray(_random_rgb(rng, 0.5, (0.2, 0.9)), np.float32)
    blobs = rng.normal(0, rng.uniform(15, 45), (cells, cells, 3)).astype(np.float32)
    blobs = blobs * rng.uniform(0.1, 1.0, 3).astype(np.float32)  # less contrast in some channels
    small = Image.fromarray(np.clip(base + blobs, 0, 255).astype(np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _plain(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.random()
    if kind < 0.3:
        rgb = (255, 255, 255)
    elif kind < 0.55:
        rgb = (0, 0, 0)
    elif kind < 0.75:
        rgb = (int(rng.integers(40, 230)),) * 3
    else:
        rgb = _random_rgb(rng, 0.45)
    return Image.new("RGB", (size, size), rgb)


def background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A random RGB background: photo crop, tinted texture, plain colour, gradient or noise."""
    kind = rng.random()
    if kind < 0.35:
        img = _shift_colours(rng, _crop(rng, _load_source(str(rng.choice(PHOTO_SOURCES))), size))
    elif kind < 0.60:
        grey = ImageOps.autocontrast(_crop(rng, _load_source(str(rng.choice(TEXTURE_SOURCES))), size))
        img = ImageOps.colorize(grey, _random_rgb(rng, 0.6, (0.0, 0.45)), _random_rgb(rng, 0.6, (0.55, 1.0)))
    elif kind < 0.75:
        img = _plain(rng, size)
    elif kind < 0.875:
        img = _gradient(rng, size)
    else:
        img = _noise_texture(rng, size)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * size / IMAGE_SIZE))
    return img


# --------------------------------------------------------------------------- rendering

SUPERSAMPLE = 3  # objects are drawn at 3x and shrunk: anti-aliased edges and digits


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene over a random background; returns (H, W, 3) uint8. `rng` only
    drives the background and the sensor noise: the objects come from the scene."""
    size, k = scene.image_size, SUPERSAMPLE
    # Colour on black plus coverage, both at k x and box-filtered down: the colour layer
    # is then premultiplied by coverage, so compositing is one multiply-add.
    colour = Image.new("RGB", (size * k, size * k), (0, 0, 0))
    coverage = Image.new("L", colour.size, 0)
    paint, cover = ImageDraw.Draw(colour), ImageDraw.Draw(coverage)
    outline = max(1, round(OUTLINE_WIDTH * size * k))
    for obj in scene.objects:
        _draw_object(paint, obj, k, fill=obj.rgb, outline=OUTLINE_RGB, width=outline)
        _draw_object(cover, obj, k, fill=255)
        if obj.digit is not None:
            px = max(1, round(obj.digit_px * k))
            l, t, _, _ = _digit_ink(obj.digit, px)
            x0, y0, _, _ = _digit_box(obj, k)
            paint.text((x0 - l, y0 - t), str(obj.digit), fill=_digit_rgb(obj.rgb), font=_font(px), anchor="lt")
    colour = np.asarray(colour.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    alpha = np.asarray(coverage.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    arr = np.asarray(background(rng, size), dtype=np.float32) * (1 - alpha) + colour
    sigma = rng.uniform(0, 10)  # sensor noise over everything, objects included
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * sigma
    return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- labels per image token

# What each image token is labelled with for the training recipe's stage-1 probe
# (models/training.py): 0 is "no object", then the index in the list plus one.
TOKEN_LABELS = (("colour", len(COLORS)), ("shape", len(SHAPES)), ("digit", 10), ("size", len(SIZE_CLASSES)))
MIN_PATCH_COVER = 0.25  # the share of a patch an object must cover to label it


def _size_class(obj: SceneObject, image_size: int) -> int:
    r = obj.size / image_size
    return min(range(len(SIZE_CLASSES)), key=lambda i: abs(r - sum(list(SIZE_CLASSES.values())[i]) / 2))


def token_labels(scene: Scene, side: int) -> np.ndarray:
    """(4, side, side) int64 labels of a side x side patch grid, from the scene description:
    the colour, shape, digit and size class of the frontmost object covering at least
    MIN_PATCH_COVER of the patch (0: none). The patch holding an object's centre always
    gets that object (unless one in front covers the centre), so small ones are not lost."""
    size = scene.image_size
    if size % side:
        raise ValueError(f"a {side}x{side} patch grid does not divide a {size} px image")
    k = size // side
    out = np.zeros((len(TOKEN_LABELS), side, side), dtype=np.int64)
    colors, shapes_ = list(COLORS), list(SHAPES)
    for obj in scene.objects:  # back to front: later objects overwrite
        cover = _mask(obj, size).reshape(side, k, side, k).mean(axis=(1, 3)) >= MIN_PATCH_COVER
        r, c = min(int(obj.y // k), side - 1), min(int(obj.x // k), side - 1)
        cover[r, c] = True
        labels = (1 + colors.index(obj.color), 1 + shapes_.index(obj.shape),
                  0 if obj.digit is None else 1 + obj.digit, 1 + _size_class(obj, size))
        for i, v in enumerate(labels):
            out[i][cover] = v
    return out


# --------------------------------------------------------------------------- scenes


def _jittered(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in COLORS[color])


def _size_classes(rng: np.random.Generator, n: int) -> list[str]:
    # Crowded images get smaller objects so that nine still fit.
    p = (0.25, 0.40, 0.35) if n <= 3 else (0.35, 0.40, 0.25) if n <= 6 else (0.55, 0.40, 0.05)
    return [str(c) for c in rng.choice(list(SIZE_CLASSES), size=n, p=p)]


def _object_spec(rng: np.random.Generator, color: str, shape: str, size_class: str, image_size: int,
                 digit_p: float) -> SceneObject:
    """An unplaced object (centre 0, 0): colour, shape, size, rotation and maybe a digit."""
    size = rng.uniform(*SIZE_CLASSES[size_class]) * image_size
    rotation = 0.0 if shape == "circle" else float(rng.uniform(0, 360))
    rgb = _jittered(rng, color)
    digit, digit_px = None, 0.0
    if shape in DIGIT_SHAPES and size_class != "small" and rng.random() < digit_p:
        digit = int(rng.integers(10))
        ink_height = rng.uniform(*DIGIT_HEIGHT) * image_size / IMAGE_SIZE
        digit_px = _digit_px(digit, _GEOMETRY[shape][2] * size, ink_height)
    return SceneObject(color, shape, 0.0, 0.0, float(size), rotation, rgb, digit, float(digit_px))


def _place(rng: np.random.Generator, specs: list[SceneObject], image_size: int, tries: int = 40):
    """Give each object a centre, back to front, keeping every object at least
    1 - MAX_COVERED visible and every digit uncovered; None when it does not fit."""
    placed: list[SceneObject] = []
    masks: list[np.ndarray] = []
    hidden: list[np.ndarray] = []  # per placed object: what the objects in front of it cover
    digit_boxes: list[tuple[int, int, int, int] | None] = []
    for spec in specs:
        reach = bounding_radius(spec) + 1
        for _ in range(tries):
            obj = dataclasses.replace(spec, x=float(rng.uniform(reach, image_size - reach)),
                                      y=float(rng.uniform(reach, image_size - reach)))
            m = _mask(obj, image_size)
            ok = True
            for j in range(len(placed)):
                if not (m & masks[j]).any():
                    continue
                box = digit_boxes[j]
                if box is not None and m[box[1]:box[3], box[0]:box[2]].any():
                    ok = False
                    break
                if ((hidden[j] | m) & masks[j]).sum() > MAX_COVERED * masks[j].sum():
                    ok = False
                    break
            if ok:
                break
        else:
            return None
        for j in range(len(placed)):
            hidden[j] = hidden[j] | m
        placed.append(obj)
        masks.append(m)
        hidden.append(np.zeros_like(m))
        if obj.digit is None:
            digit_boxes.append(None)
        else:  # the ink box, grown by a pixel, must stay clear
            l, t, r, b = (v / SUPERSAMPLE for v in _digit_box(obj, SUPERSAMPLE))  # as render draws it
            digit_boxes.append((max(0, math.floor(l) - 1), max(0, math.floor(t) - 1),
                                math.ceil(r) + 1, math.ceil(b) + 1))
    return placed


ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)


def random_scene(rng: np.random.Generator, pairs: list[tuple[str, str]], image_size: int = IMAGE_SIZE,
                 digit_p: float = 0.5, digit_first: bool = False) -> Scene | None:
    """A scene of the given distinct (colour, shape) pairs, placed at random; None when
    they did not fit. With `digit_first` the first pair must be a DIGIT_SHAPE and gets a digit."""
    classes = _size_classes(rng, len(pairs))
    specs = []
    for i, (color, shape) in enumerate(pairs):
        if digit_first and i == 0:
            cls = classes[0] if classes[0] != "small" else "medium"
            specs.append(_object_spec(rng, color, shape, cls, image_size, digit_p=1.0))
        else:
            specs.append(_object_spec(rng, color, shape, classes[i], image_size, digit_p))
    specs.sort(key=lambda o: -o.size)  # big ones at the back, as a person would stack them
    placed = _place(rng, specs, image_size)
    return None if placed is None else Scene(tuple(placed), image_size)


def _random_pairs(rng: np.random.Generator, n: int, pool=ALL_PAIRS) -> list[tuple[str, str]]:
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def _count_pairs(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """Pairs for a scene in which some count question has answer k."""
    kinds = ["objects"] + (["color"] if k <= len(SHAPES) else []) + (["shape"] if k <= len(COLORS) else [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "objects":
        return _random_pairs(rng, k)
    if kind == "color":
        c = str(rng.choice(list(COLORS)))
        same = [(c, s) for s in SHAPES]
        other = [p for p in ALL_PAIRS if p[0] != c]
    else:
        s = str(rng.choice(SHAPES))
        same = [(c, s) for c in COLORS]
        other = [p for p in ALL_PAIRS if p[1] != s]
    extra = int(rng.integers(0, min(MAX_OBJECTS - k, 5) + 1))
    pairs = _random_pairs(rng, k, same) + _random_pairs(rng, extra, other)
    return [pairs[i] for i in rng.permutation(len(pairs))]


# --------------------------------------------------------------------------- questions


def _margin(scene: Scene) -> float:
    return POSITION_MARGIN * scene.image_size


def _singled_out(target: SceneObject, group: list[SceneObject], scene: Scene) -> list[str]:
    """The superlatives that pick `target` out of `group` (objects sharing an attribute
    with it) with a clear margin; [""] when it is alone in its group."""
    others = [o for o in group if o is not target]
    if not others:
        return [""]
    m = _margin(scene)
    words = []
    if target.size >= SIZE_RATIO * max(o.size for o in others):
        words.append("largest")
    if target.size * SIZE_RATIO <= min(o.size for o in others):
        words.append("smallest")
    if target.x + m <= min(o.x for o in others):
        words.append("leftmost")
    if target.x - m >= max(o.x for o in others):
        words.append("rightmost")
    if target.y + m <= min(o.y for o in others):
        words.append("topmost")
    if target.y - m >= max(o.y for o in others):
        words.append("bottommost")
    return words


def _pick(rng: np.random.Generator, options: list):
    return options[rng.integers(len(options))] if options else None


def _ask_attribute(scene: Scene, rng: np.random.Generator, asked: str):
    """colour: name the shape (plus a superlative when it repeats), answer the colour;
    shape: the other way round."""
    key = "shape" if asked == "color" else "color"
    for i in rng.permutation(len(scene.objects)):
        target = scene.objects[i]
        group = [o for o in scene.objects if getattr(o, key) == getattr(target, key)]
        word = _pick(rng, _singled_out(target, group, scene))
        if word is None:
            continue
        lead = f"{word} " if word else ""
        if asked == "color":
            return f"what color is the {lead}{target.shape} ?", target.color
        return f"what shape is the {lead}{target.color} object ?", target.shape
    return None


def _count_questions(scene: Scene) -> list[tuple[str, str]]:
    objs = scene.objects
    out = [("how many objects are there ?", COUNT_WORDS[len(objs)])]
    out += [(f"how many {c} objects are there ?", COUNT_WORDS[sum(o.color == c for o in objs)]) for c in COLORS]
    out += [(f"how many {PLURALS[s]} are there ?", COUNT_WORDS[sum(o.shape == s for o in objs)]) for s in SHAPES]
    return out


def _ask_count(scene: Scene, rng: np.random.Generator, want: str | None):
    questions = _count_questions(scene)
    if want is None:  # every answer the scene allows is equally likely, not every question
        want = _pick(rng, sorted({a for _, a in questions}))
    # Then each kind (all objects, one colour, one shape) that has this answer is equally
    # likely, so that "how many objects" does not crowd out the counts that need binding.
    kinds = {}
    for q, a in questions:
        if a == want:
            kinds.setdefault("objects" if q.startswith("how many objects") else "color" if " objects " in q
                             else "shape", []).append((q, a))
    return _pick(rng, kinds[_pick(rng, sorted(kinds))]) if kinds else None


def _ask_exist(scene: Scene, rng: np.random.Generator, want: str | None):
    want = want or ("yes" if rng.random() < 0.5 else "no")
    present = {(o.color, o.shape) for o in scene.objects}
    if want == "yes":
        pair = _pick(rng, sorted(present))
    else:
        # Mostly ask for a colour and a shape that are both in the image, only not
        # together: the model must bind them rather than spot either one.
        colours, shapes_ = {c for c, _ in present}, {s for _, s in present}
        tricky = [p for p in ALL_PAIRS if p not in present and p[0] in colours and p[1] in shapes_]
        absent = [p for p in ALL_PAIRS if p not in present]
        pair = _pick(rng, tricky if tricky and rng.random() < 0.75 else absent)
    return None if pair is None else (f"is there a {pair[0]} {pair[1]} ?", want)


def _relation_holds(a: SceneObject, relation: str, b: SceneObject, margin: float) -> bool | None:
    """True or False when the relation clearly holds or clearly fails, None near a tie."""
    d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    return True if d >= margin else False if d <= -margin else None


def _nearest_question(scene: Scene, rng: np.random.Generator):
    options = []
    for a in scene.objects:
        others = sorted(((math.hypot(o.x - a.x, o.y - a.y), o) for o in scene.objects if o is not a),
                        key=lambda pair: pair[0])
        if len(others) < 2:
            continue
        (d1, first), (d2, second) = others[0], others[1]
        gap1, gap2 = d1 - first.size, d2 - second.size  # roughly edge to edge
        if d2 >= NEAREST_RATIO * d1 and gap2 >= gap1 + _margin(scene) / 2:
            options.append((f"what color is the object nearest to the {a.name} ?", first.color))
    return _pick(rng, options)


def _ask_position(scene: Scene, rng: np.random.Generator, want: str | None):
    if want is None and rng.random() < 0.3:
        qa = _nearest_question(scene, rng)
        if qa is not None:
            return qa
    want = want or ("yes" if rng.random() < 0.5 else "no")
    options = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            for relation in RELATIONS:
                if _relation_holds(a, relation, b, _margin(scene)) == (want == "yes"):
                    options.append(f"is the {a.name} {relation} the {b.name} ?")
    q = _pick(rng, options)
    return None if q is None else (q, want)


def _ask_size(scene: Scene, rng: np.random.Generator, want: str | None):
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a.size >= SIZE_RATIO * b.size]  # a > b
    if not pairs:
        return None
    comparative = "bigger" if rng.random() < 0.5 else "smaller"
    if want is None and rng.random() < 0.4:
        # "which is bigger , the red circle or the red star ?" -> circle: only between
        # objects that share one attribute, so that one word tells them apart.
        alike = [(a, b) for a, b in pairs if a.color == b.color or a.shape == b.shape]
        if alike:
            big, small = alike[rng.integers(len(alike))]
            first, second = (big, small) if rng.random() < 0.5 else (small, big)
            winner = big if comparative == "bigger" else small
            answer = winner.shape if big.color == small.color else winner.color
            return f"which is {comparative} , the {first.name} or the {second.name} ?", answer
    want = want or ("yes" if rng.random() < 0.5 else "no")
    big, small = pairs[rng.integers(len(pairs))]
    # "is the A bigger than the B ?" is yes when A is the big one; "smaller" flips it.
    a_is_big = (want == "yes") == (comparative == "bigger")
    a, b = (big, small) if a_is_big else (small, big)
    return f"is the {a.name} {comparative} than the {b.name} ?", want


def _ask_detail(scene: Scene, rng: np.random.Generator):
    obj = _pick(rng, [o for o in scene.objects if o.digit is not None])
    return None if obj is None else (f"which digit is on the {obj.name} ?", DIGIT_WORDS[obj.digit])


def ask(scene: Scene, family: str, rng: np.random.Generator, want: str | None = None):
    """A (question, answer) of `family` about the scene, or None when the scene cannot
    pose one. `want` asks for a given answer (yes/no, or a count word) where it can."""
    if family == "colour":
        return _ask_attribute(scene, rng, "color")
    if family == "shape":
        return _ask_attribute(scene, rng, "shape")
    if family == "count":
        return _ask_count(scene, rng, want)
    if family == "exist":
        return _ask_exist(scene, rng, want)
    if family == "position":
        return _ask_position(scene, rng, want)
    if family == "size":
        return _ask_size(scene, rng, want)
    if family == "detail":
        return _ask_detail(scene, rng)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_sample(rng: np.random.Generator, family: str, image_size: int = IMAGE_SIZE) -> Sample:
    """One question of `family` about a fresh scene. Counts are drawn uniformly from
    zero..nine first and the scene is built to match; other families see 2..6 objects."""
    # Drawn once, so that a crowded scene that fails to fit is retried, not skipped.
    count = int(rng.integers(len(COUNT_WORDS))) if family == "count" else None
    while True:
        want = None
        if family == "count":
            pairs, want = _count_pairs(rng, count), COUNT_WORDS[count]
        elif family == "detail":
            first = _random_pairs(rng, 1, [p for p in ALL_PAIRS if p[1] in DIGIT_SHAPES])
            rest = [p for p in ALL_PAIRS if p != first[0]]
            pairs = first + _random_pairs(rng, int(rng.integers(1, 6)), rest)
        else:
            pairs = _random_pairs(rng, int(rng.integers(2, 7)))
        scene = random_scene(rng, pairs, image_size, digit_first=family == "detail")
        if scene is None:
            continue
        qa = ask(scene, family, rng, want)
        if qa is not None:
            return Sample(render(scene, rng), qa[0], qa[1], family, scene)


def train_batch(seed: int, step: int, batch_size: int, families: tuple[str, ...] = FAMILIES,
                stream: int = 1, image_size: int = IMAGE_SIZE) -> list[Sample]:
    """Training batch number `step` of stream `stream` (>= 1) for `seed`: deterministic,
    so a resumed run sees exactly the batches it would have seen. Families are balanced
    per batch. Stream 0 belongs to the held-out set."""
    if stream < 1:
        raise ValueError("training streams are numbered from 1; stream 0 is the held-out set's")
    rng = np.random.default_rng([seed, stream, step])
    return [make_sample(rng, families[(step * batch_size + i) % len(families)], image_size)
            for i in range(batch_size)]


def train_stream(seed: int, batch_size: int, start: int = 0, families: tuple[str, ...] = FAMILIES,
                 stream: int = 1, image_size: int = IMAGE_SIZE) -> Iterator[list[Sample]]:
    """The endless training stream, batch by batch from step `start`."""
    step = start
    while True:
        yield train_batch(seed, step, batch_size, families, stream, image_size)
        step += 1


HELDOUT_SEED = 20261124
HELDOUT_STREAM = 0  # train_batch refuses stream 0, so no training batch meets the held-out set


def heldout(per_family: int = 500, families: tuple[str, ...] = FAMILIES, image_size: int = IMAGE_SIZE) -> list[Sample]:
    """The fixed held-out set: `per_family` questions per family, the same everywhere;
    a smaller set is a prefix of each family's list in a larger one."""
    out = []
    for fam in families:
        rng = np.random.default_rng([HELDOUT_SEED, HELDOUT_STREAM, FAMILIES.index(fam)])
        out.extend(make_sample(rng, fam, image_size) for _ in range(per_family))
    return out


# --------------------------------------------------------------------------- files


def write_llava(samples: list[Sample], out_dir: str | Path, name: str = "data") -> Path:
    """Write images/<id>.png and <name>.json (LLaVA conversation records) under out_dir;
    returns the JSON path. Image paths in the JSON are relative to it."""
    from edgeqtl.data import write_samples

    return write_samples(samples, out_dir, name, image_first=CHAT.image_first)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if font.getlength(trial) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _captioned(sample: Sample, zoom: int) -> Image.Image:
    """The sample enlarged (nearest: the pixels the model sees) with its Q and A below."""
    size = sample.image.shape[0] * zoom
    font = _font(max(11, size // 18))
    lines = _wrap(sample.question, font, size - 8) + [f"-> {sample.answer}   [{sample.family}]"]
    line_h = font.size + 4
    tile = Image.new("RGB", (size, size + line_h * 4 + 6), (255, 255, 255))
    tile.paste(Image.fromarray(sample.image).resize((size, size), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(lines):
        draw.text((4, size + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    return tile


def write_examples(directory: str | Path, seed: int = 7) -> list[Path]:
    """Docs images: scenes-<family>.png (one example each) and scenes-grid.png (12 samples)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k, fam in enumerate(FAMILIES):
        sample = make_sample(np.random.default_rng([seed, 1, k]), fam)
        path = directory / f"scenes-{fam}.png"
        _captioned(sample, 3).save(path)
        written.append(path)
    rng = np.random.default_rng([seed, 2])
    tiles = [_captioned(make_sample(rng, FAMILIES[i % len(FAMILIES)]), 2) for i in range(12)]
    cols, (w, h) = 4, tiles[0].size
    sheet = Image.new("RGB", (cols * (w + 8) + 8, 3 * (h + 8) + 8), (200, 200, 200))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (8 + (i % cols) * (w + 8), 8 + (i // cols) * (h + 8)))
    path = directory / "scenes-grid.png"
    sheet.save(path)
    written.append(path)
    return written


# --------------------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    words = set("user : assistant ? , what color is the shape object objects how many are there a".split())
    words |= set("which or digit on bigger smaller than of to nearest yes no".split())
    words |= {w for rel in RELATIONS for w in rel.split()} | set(SUPERLATIVES)
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(COUNT_WORDS) | set(DIGIT_WORDS)
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer():
    """A word-level `tokenizers.Tokenizer` over vocabulary(), built locally."""
    return word_tokenizer(vocabulary())


def prompts(image_token_count: int, tokenizer=None) -> PromptEncoder:
    """This world's prompt encoder: its tokenizer, the shapes world's chat format."""
    return prompt_encoder(tokenizer or build_tokenizer(), image_token_count, CHAT)


def save_tokenizer(directory: str | Path, image_token_count: int) -> None:
    """Write tokenizer.json plus the chat settings beside it (edgeqtl_chat.json)."""
    prompts(image_token_count).save(directory)
