"""The samples export runs the PyTorch client on: to fit the entropy model of the codes,
and to verify the ONNX graphs against PyTorch. Always in small batches, under
torch.inference_mode, so that a real-size model (729 image tokens a sample) fits.

Where they come from, in order:
  --calibration-data   a folder of images (each asked "Describe the image."), or a data
                       file of LLaVA records (their images and first questions)
  a model trained on   its own world (shapes or scenes, as edgeqtl_split.json records it):
  a built-in world     generated training questions (never the held-out set) to fit,
                       the held-out set to verify (with its answers, so the ONNX
                       client's accuracy can be compared with PyTorch's)
  any other checkpoint shapes images with their questions, with a warning: the codes'
                       statistics then are not those of the user's images
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from edgeqtl import shapes
from edgeqtl.imageproc import IMAGE_SUFFIXES, ImageSpec, preprocess
from edgeqtl.prompt import PromptEncoder

DEFAULT_PROMPT = "Describe the image."
FIT_SEED = 20_231  # generated training questions, never the held-out set


@dataclasses.dataclass
class Sample:
    image: object  # PIL image or (H, W, 3) uint8 array
    prompt: str
    answer: str | None = None


def user_samples(path: Path, limit: int) -> list[Sample]:
    """The first `limit` samples of a folder of images or a LLaVA data file."""
    from edgeqtl.data import DataError, check_records, load_records, open_rgb

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}; give a folder of images like "
                            "the device's, or a data file of LLaVA records")
        return [Sample(open_rgb(f), DEFAULT_PROMPT) for f in files]
    records = check_records(load_records(path), skip_bad=True).records[:limit]
    return [Sample(open_rgb(r.image), r.prompt, r.answers[0] if r.answers else None) for r in records]


def world_samples(n: int, heldout: bool, world=shapes) -> list[Sample]:
    if heldout:
        per = max(1, n // len(world.FAMILIES))
        return [Sample(s.image, s.question, s.answer) for s in world.heldout(per)]
    return [Sample(s.image, s.question, s.answer) for s in world.train_batch(FIT_SEED, 0, n)]


@dataclasses.dataclass
class Inputs:
    """A batch as the device builds it."""

    pixel_values: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    answers: list[str | None]


def batches(samples: list[Sample], prompts: PromptEncoder, image: ImageSpec, batch_size: int):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ids, mask = prompts.encode([s.prompt for s in chunk])
        yield Inputs(preprocess([s.image for s in chunk], image), ids, mask, [s.answer for s in chunk])


@torch.inference_mode()
def client_codes(model, inputs: Inputs) -> np.ndarray:
    """The PyTorch client's wire output for a batch (codes, or fp16 hidden states)."""
    return model.client(torch.from_numpy(inputs.input_ids), torch.from_numpy(inputs.attention_mask),
                        torch.from_numpy(inputs.pixel_values)).wire.numpy()


@torch.inference_mode()
def fit_entropy_model(model, samples: list[Sample], prompts: PromptEncoder, image: ImageSpec, batch_size: int,
                      progress=None, image_only: bool = False):
    """Per-dimension code histograms over the samples' tokens (text and image alike; with
    image_only, the image positions alone: what goes up as codes when the prompt's text
    goes as ids), counted batch by batch."""
    from edgeqtl.codec import EntropyModel

    levels, dim = model.split.levels, model.split.code_dim
    counts = np.ones((dim, levels), np.int64)  # add-one: every code stays codable
    for inputs in batches(samples, prompts, image, batch_size):
        sent = inputs.attention_mask.astype(bool)
        if image_only:
            sent &= inputs.input_ids == prompts.image_token_id
        codes = client_codes(model, inputs)[sent].astype(np.int64)
        np.add.at(counts, (np.broadcast_to(np.arange(dim), codes.shape), codes), 1)
        if progress is not None:
            progress(len(inputs.answers))
    return EntropyModel(counts)
