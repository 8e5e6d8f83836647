"""Image preprocessing shared by training, export verification and the device agent.

numpy + Pillow only (the device path never imports torch). The parameters travel in
the bundle manifest as an `ImageSpec`, so the device resizes and normalises exactly as
the model was trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import EdgeqtlError

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(EdgeqtlError, ValueError):
    """An image that cannot be read or used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    # Idefics3/SmolVLM processors first resize the longest edge to this (keeping the
    # aspect ratio, an even short side), then to the square: None for one resize
    longest_edge: int | None = None
    # LLaVA-OneVision's untiled view: padded to a square in the mean colour, then resized
    pad_square: bool = False

    def to_dict(self) -> dict:
        d = {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resample": self.resample}
        if self.longest_edge is not None:
            d["longest_edge"] = self.longest_edge
        if self.pad_square:
            d["pad_square"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        if d.get("resample", "bicubic") not in _RESAMPLING:
            raise ImageError(f"unknown resampling {d.get('resample')!r}; expected one of {sorted(_RESAMPLING)}")
        edge = d.get("longest_edge")
        return cls(int(d["size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
                   d.get("resample", "bicubic"), int(edge) if edge is not None else None, bool(d.get("pad_square")))


_MAX_LONGEST_EDGE = 4096  # transformers' Idefics3 MAX_IMAGE_SIZE


def longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longest edge at `longest`, as Idefics3's processor rounds
    it: the short side truncated, then made even; then kept under 4096."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if width >= height and width > _MAX_LONGEST_EDGE:
        width, height = _MAX_LONGEST_EDGE, int(_MAX_LONGEST_EDGE / aspect)
    elif height > width and height > _MAX_LONGEST_EDGE:
        height, width = _MAX_LONGEST_EDGE, int(_MAX_LONGEST_EDGE * aspect)
    return max(width, 1), max(height, 1)


def load_image(path: str | Path, decode_size: int | None = None) -> Image.Image:
    """Any image file -> upright RGB (EXIF rotation applied; transparency composited on
    white; grey, palette, CMYK and 16-bit modes converted), with one clear error for a
    missing or unreadable file. With decode_size, JPEGs decode at the smallest 1/2^k
    scale that keeps both sides >= decode_size (the model resizes anyway)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if decode_size is not None:
                im.draft(None, (decode_size, decode_size))
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # Pillow's decoders raise many types for corrupt files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey: Pillow's convert would clip to white
        grey = np.clip(np.asarray(im, dtype=np.float32) / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def pad_to_square(im: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square of its longest side (transformers' pad_to_square)."""
    side = max(im.size)
    out = Image.new("RGB", (side, side), colour)
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out


def preprocess(images, spec: ImageSpec) -> np.ndarray:
    """PIL images or (H, W, 3) uint8 arrays -> float32 pixel values (B, 3, S, S)."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            if im.shape[:2] != (spec.size, spec.size):
                im = Image.fromarray(im)
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            if spec.pad_square and im.width != im.height:
                im = pad_to_square(im, tuple(int(m * 255) for m in spec.mean))
            if spec.longest_edge is not None:
                im = im.resize(longest_edge_size(*im.size, spec.longest_edge), _RESAMPLING[spec.resample])
            im = np.asarray(im.resize((spec.size, spec.size), _RESAMPLING[spec.resample]))
        out[i] = (im.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
    return out
