"""How the server picks each next token: the checkpoint's own generation settings, a
request's overrides within the server's limits, and sampling that repeats for a retry.

    GenerationSettings  what the server half says (from the checkpoint's generation_config.json
                        and tokenizer at export) plus the server's limits (`server serve` flags)
    Decoding            one request's settings, resolved: end ids, max new tokens, temperature,
                        top-p, repetition penalty, stop strings, and its own random generator

The generator is seeded from the request's seed, or else from its request id, so that a
retried request (same id) gets the same answer from any server agent of the group.
"""
from __future__ import annotations

import dataclasses

import torch

from edgeqtl.errors import CodedError
from edgeqtl.wire import InferOptions

DEFAULT_MAX_NEW_TOKENS = 8  # when the checkpoint says nothing (the tiny world's answers are a word or two)
DEFAULT_MAX_NEW_TOKENS_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # a request's default
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT  # no request gets more
    temperature: float = 0.0  # 0: greedy (the default unless the checkpoint samples)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    allow_sampling: bool = True  # False: the server decodes greedily whatever a request asks

    @classmethod
    def from_meta(cls, meta: dict, **overrides) -> "GenerationSettings":
        """From the server half's `generation` record (written at export); a half
        exported before it has only `text.eos_token_id`."""
        g = dict(meta.get("generation") or {})
        eos = g.get("eos_token_ids") or [meta.get("text", {}).get("eos_token_id", 0)]
        fields = {"eos_token_ids": tuple(int(t) for t in eos)}
        for key in ("max_new_tokens", "temperature", "top_p", "repetition_penalty"):
            if g.get(key) is not None:
                fields[key] = g[key]
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if fields.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS) > fields.get("max_new_tokens_limit",
                                                                             DEFAULT_MAX_NEW_TOKENS_LIMIT):
            fields["max_new_tokens_limit"] = fields["max_new_tokens"]
        return cls(**fields)

    def resolve(self, options: InferOptions, request_id: bytes) -> "Decoding":
        """One request's decoding. Its max new tokens is capped at the server's limit;
        sampling a server does not allow is refused (`bad_options`), not silently dropped."""
        want = options.max_new_tokens or self.max_new_tokens
        temperature = self.temperature if options.temperature is None else options.temperature
        if temperature > 0 and not self.allow_sampling:
            raise CodedError("bad_options", "this server decodes greedily only (started with --greedy); "
                                            "drop the temperature")
        seed = options.seed if options.seed is not None else int.from_bytes(request_id[:8], "little") >> 1
        gen = torch.Generator().manual_seed(seed)
        return Decoding(eos=frozenset(self.eos_token_ids), max_new_tokens=min(want, self.max_new_tokens_limit),
                        capped=want > self.max_new_tokens_limit, temperature=temperature,
                        top_p=self.top_p if options.top_p is None else options.top_p,
                        repetition_penalty=self.repetition_penalty, stop=options.stop, stream=options.stream,
                        generator=gen)


@dataclasses.dataclass
class Decoding:
    eos: frozenset[int]
    max_new_tokens: int
    capped: bool  # the request asked for more than the server's limit
    temperature: float
    top_p: float
    repetition_penalty: float
    stop: tuple[str, ...]
    stream: int  # TOKENS every this many tokens; 0: none
    generator: torch.Generator

    def pick(self, logits: torch.Tensor, generated: list[int]) -> int:
        """The next token from one row's logits (V,)."""
        logits = logits.float()
        if self.repetition_penalty != 1.0 and generated:
            # As transformers does, over what this answer has said so far (the server
            # never sees the prompt's ids, only their codes).
            seen = torch.tensor(sorted(set(generated)), device=logits.device)
            vals = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def stop_at(self, text: str) -> int | None:
        """Where the answer ends in `text` (the first stop string), or None."""
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None
