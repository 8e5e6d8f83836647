"""Prompts -> token ids the way the device does it: chat template, image placeholder
expanded to the image token count, left padding. Torch-free (tokenizers + numpy)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import TextSpec
from .errors import EdgeqtlError


class PromptError(EdgeqtlError, ValueError):
    """A prompt the bundle cannot encode."""


class PromptEncoder:
    def __init__(self, tokenizer, text: TextSpec):
        self.tok = tokenizer
        self.text = text

    @classmethod
    def from_bundle(cls, directory: str | Path, text: TextSpec) -> "PromptEncoder":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / text.tokenizer_file)), text)

    def render(self, prompt: str) -> str:
        t = self.text
        return t.chat_template.format(image=t.image_token * t.image_token_count, prompt=prompt)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids int64 (B, T), attention_mask int64 (B, T)), left padded."""
        encs = self.tok.encode_batch([self.render(p) for p in prompts])
        seqs = [e.ids for e in encs]
        for p, s in zip(prompts, seqs):
            n = s.count(self.text.image_token_id)
            if n != self.text.image_token_count:
                raise PromptError(f"prompt {p[:40]!r} yields {n} image tokens, expected {self.text.image_token_count}: "
                                 f"do not write {self.text.image_token!r} in the prompt yourself")
        T = max(map(len, seqs))
        ids = np.full((len(seqs), T), self.text.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(seqs), T), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = s
            mask[i, T - len(s):] = 1
        return ids, mask

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.text.eos_token_id])
