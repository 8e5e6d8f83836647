"""SmolVLM's image splitting on the device (numpy + Pillow, no torch): an image becomes
up to 4 x 4 tiles at the tower's size plus one global view, each 64 image tokens, as
the Idefics3/SmolVLM processor makes them (its PIL path):

  1. the longest edge to `longest_edge` (2048), aspect kept, the short side made even;
  2. both sides up to multiples of the tile (512), aspect kept;
  3. row-major crops of tile x tile, then the whole image resized to one tile (global);
  4. the prompt: per tile <fake_token_around_image><row_R_col_C> and its image tokens, a
     newline after each row, then a newline and the global view as without splitting.

An image no larger than one tile after step 2 is the global view alone. The number of
image tokens then depends on the image, so it travels in each request (the prompt ids'
image positions and the image part's rows, docs/PROTOCOL.md); the server assumes none.
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TileSpec | None":
        return cls(**d) if d else None


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
