"""Batches: images and conversations -> the tensors both halves train and evaluate on,
tokenised exactly as the device tokenises (edgeqtl.prompt), whatever the data source:
the built-in worlds' samples or a user's LLaVA records (edgeqtl.data)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from edgeqtl.imageproc import ImageSpec, preprocess
from edgeqtl.prompt import ASSISTANT, USER, PromptEncoder


@dataclasses.dataclass
class Example:
    image: Any  # RGB: a PIL image or an (H, W, 3) uint8 array
    turns: list[tuple[str, str]]  # (role, text), alternating from the user
    category: str | None = None  # the question family (worlds) or the record's category
    source: Any = None  # the sample or record it came from

    @property
    def answer(self) -> str | None:
        """The last assistant turn: what evaluation compares and generation predicts."""
        return self.turns[-1][1] if self.turns and self.turns[-1][0] == ASSISTANT else None

    def prompt_turns(self) -> list[tuple[str, str]]:
        """The conversation up to the answer to predict."""
        return self.turns[:-1] if self.answer is not None else list(self.turns)


def world_example(sample) -> Example:
    """A built-in world's Sample (edgeqtl.shapes): one question, one answer."""
    return Example(sample.image, [(USER, sample.question), (ASSISTANT, sample.answer)], sample.family, sample)


def record_example(record, image) -> Example:
    """A user's Record (edgeqtl.data) with its decoded image."""
    return Example(image, [(t.role, t.text) for t in record.turns], record.category, record)


@dataclasses.dataclass
class Batch:
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_LABEL where no loss
    samples: list  # each example's source (a Sample's objects feed the tiny preset's probe)
    examples: list[Example] = dataclasses.field(default_factory=list)


class Collator:
    """Examples -> a left-padded Batch. with_answer=False: the prompt only (up to the
    answer to predict), for evaluation and generation."""

    def __init__(self, prompts: PromptEncoder, image_spec: ImageSpec):
        self.prompts = prompts
        self.spec = image_spec

    @property
    def tok(self):
        return self.prompts.tok

    def example(self, item) -> Example:
        return item if isinstance(item, Example) else world_example(item)

    def __call__(self, items, with_answer: bool = True) -> Batch:
        examples = [self.example(x) for x in items]
        enc = self.prompts.encode_conversations([ex.turns if with_answer else ex.prompt_turns() for ex in examples])
        pix = torch.from_numpy(preprocess([ex.image for ex in examples], self.spec))
        return Batch(pix, torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask),
                     torch.from_numpy(enc.labels), [ex.source for ex in examples], examples)


def image_spec_of(model) -> ImageSpec:
    """How the model's images are preprocessed: the export's ImageSpec when the model
    directory recorded one, else the vision tower's size with SigLIP's mean/std."""
    spec = getattr(model, "image_spec", None)
    if spec is not None:
        return spec
    return ImageSpec(size=model.family.image_size(model.hf.config))
