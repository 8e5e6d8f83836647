"""Images in several views on the device (numpy + Pillow, no torch).

SmolVLM's image splitting (`TileSpec`): an image becomes
up to 4 x 4 tiles at the tower's size plus one global view, each 64 image tokens, as
the Idefics3/SmolVLM processor makes them (its PIL path):

  1. the longest edge to `longest_edge` (2048), aspect kept, the short side made even;
  2. both sides up to multiples of the tile (512), aspect kept;
  3. row-major crops of tile x tile, then the whole image resized to one tile (global);
  4. the prompt: per tile <fake_token_around_image><row_R_col_C> and its image tokens, a
     newline after each row, then a newline and the global view as without splitting.

An image no larger than one tile after step 2 is the global view alone.

LLaVA-OneVision's any-resolution tiling (`AnyresSpec`), as its image processor and
model make it: the grid (rows x cols of 384 px tiles) that keeps the most of the image,
the image resized into it and padded with black, the tiles row-major after a base view
(the whole image resized to 384 px); the model then lays the tiles' features out as one
grid, crops the padding away, and appends the newline vector after each row. The device
computes that layout as an index into [base, tiles, newline] features (`anyres_index`),
and the image graph gathers by it before the quantizer.

Either way the number of image tokens depends on the image, so it travels in each
request (the prompt ids' image positions and the image part's rows, docs/PROTOCOL.md);
the server assumes none.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from .imageproc import _RESAMPLING, ImageSpec, longest_edge_size


@dataclasses.dataclass(frozen=True)
class TileSpec:
    tile: int  # the tower's image size: each tile's side
    longest_edge: int  # step 1
    tokens_per_tile: int  # image tokens per tile (and for the global view)
    fake: str = "<fake_token_around_image>"
    row_col: str = "<row_{row}_col_{col}>"
    kind: str = "split"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AnyresSpec:
    tile: int  # the tower's image size (384)
    grid: int  # patches per side of one tile's features (27)
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) grids the device may choose
    kind: str = "anyres"

    def to_dict(self) -> dict:
        return {"tile": self.tile, "grid": self.grid, "pinpoints": [list(p) for p in self.pinpoints],
                "kind": self.kind}


def tiling_from_dict(d: dict | None):
    """A bundle's `image_tiling` as a TileSpec or an AnyresSpec (None: one view)."""
    if not d:
        return None
    if d.get("kind") == "anyres":
        return AnyresSpec(int(d["tile"]), int(d["grid"]), tuple(tuple(int(x) for x in p) for p in d["pinpoints"]))
    return TileSpec(**d)


# --------------------------------------------------------------------------- OneVision any-resolution

def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) grid that keeps the most of the image, then wastes the least
    (transformers' select_best_resolution)."""
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def anyres_views(im: Image.Image, image: ImageSpec, spec: AnyresSpec) -> tuple[np.ndarray, int, int]:
    """(pixel values (1 + rows x cols, 3, S, S), rows, cols): the base view, then the tiles."""
    resample = _RESAMPLING[image.resample]
    im = im.convert("RGB")
    th, tw = best_resolution(im.height, im.width, spec.pinpoints)
    sw, sh = tw / im.width, th / im.height
    if sw < sh:
        nw, nh = tw, min(math.ceil(im.height * sw), th)
    else:
        nh, nw = th, min(math.ceil(im.width * sh), tw)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(im.resize((nw, nh), resample), ((tw - nw) // 2, (th - nh) // 2))
    t = spec.tile
    rows, cols = th // t, tw // t
    views = [im.resize((t, t), resample)] + [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t))
                                             for r in range(rows) for c in range(cols)]
    mean = np.asarray(image.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None, None]
    out = np.stack([(np.asarray(v).transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std for v in views])
    return out, rows, cols


def anyres_index(height: int, width: int, rows: int, cols: int, spec: AnyresSpec) -> np.ndarray:
    """(P,) int64: for each image token in order, its source in the flattened features
    [base view (g x g), tiles (rows x cols x g x g, row-major), the newline vector]: the
    base view, then the tiles' grid without its padding, a newline after each row (the
    layout of transformers' pack_image_features and unpad_image)."""
    g = spec.grid
    gh, gw = rows * g, cols * g
    if width / height > gw / gh:
        new_h = int(round(height * (gw / width), 7))
        pad = (gh - new_h) // 2
        ys, xs = np.arange(pad, gh - pad), np.arange(gw)
    else:
        new_w = int(round(width * (gh / height), 7))
        pad = (gw - new_w) // 2
        ys, xs = np.arange(gh), np.arange(pad, gw - pad)
    newline = g * g * (1 + rows * cols)
    tile = (ys[:, None] // g) * cols + xs[None, :] // g
    src = g * g * (1 + tile) + (ys[:, None] % g) * g + xs[None, :] % g
    src = np.concatenate([src, np.full((len(ys), 1), newline)], axis=1)
    return np.concatenate([np.arange(g * g), src.reshape(-1)]).astype(np.int64)


def tile_grid(width: int, height: int, tile: int) -> tuple[int, int, int, int]:
    """Step 2 on an image of (width, height) after step 1: (rows, cols, width, height),
    with rows = cols = 0 for an image that is one tile."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    if height > tile or width > tile:
        return height // tile, width // tile, width, height
    return 0, 0, width, height


def split_image(im: Image.Image, image: ImageSpec, spec: TileSpec) -> tuple[np.ndarray, int, int]:
    """(pixel values (tiles + 1, 3, S, S), rows, cols): the tiles row by row, then the
    global view, normalised as `image` says."""
    resample = _RESAMPLING[image.resample]
    im = im.convert("RGB")
    im = im.resize(longest_edge_size(*im.size, spec.longest_edge), resample)
    rows, cols, width, height = tile_grid(*im.size, spec.tile)
    im = im.resize((width, height), resample)
    t = spec.tile
    views = [im.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
    views.append(im.resize((t, t), resample) if rows else im)
    mean = np.asarray(image.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None, None]
    out = np.stack([(np.asarray(v).transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std for v in views])
    return out, rows, cols


def tiles_text(rows: int, cols: int, image_token: str, spec: TileSpec) -> str:
    """The prompt's text for the tiles (the global view's follows, wrapped as without
    splitting); empty for an image that is one tile."""
    if not rows:
        return ""
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += spec.fake + spec.row_col.format(row=r + 1, col=c + 1) + image_token * spec.tokens_per_tile
        text += "\n"
    return text + "\n"
