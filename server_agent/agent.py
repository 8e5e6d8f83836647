"""The server agent: generation engines (one per server half, routed by fingerprint)
behind a Responder on the shared subscription. Several agents on one broker split the
fleet's requests between them."""
from __future__ import annotations

import json
from pathlib import Path

from edgeqtl.transport import DEFAULT_GROUP, BrokerConfig, Responder

from .engine import GenerationEngine
from .image_cache import ImageCache
from .router import EngineRouter
from .sampling import GenerationSettings


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_engine(server_half: str | Path, max_new_tokens: int | None = None, device: str = "cpu",
                dtype: str | None = None, max_batch_tokens: int | None = None,
                max_new_tokens_limit: int | None = None, greedy: bool = False,
                image_cache: ImageCache | None = None) -> GenerationEngine:
    """dtype: fp32 (the default on the CPU), bf16 (the default on CUDA) or fp16.
    max_new_tokens: a request's default (None: the checkpoint's, else 8);
    max_new_tokens_limit: no request gets more; greedy: refuse sampling."""
    import torch
    from tokenizers import Tokenizer

    from edgeqtl.models.server_half import load_server_half

    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    bundle = load_server_half(server_half, getattr(torch, DTYPES[dtype]))
    tokenizer = Tokenizer.from_file(str(Path(server_half) / "tokenizer.json"))
    settings = GenerationSettings.from_meta(bundle.meta, max_new_tokens=max_new_tokens,
                                            max_new_tokens_limit=max_new_tokens_limit,
                                            allow_sampling=False if greedy else None)
    return GenerationEngine(bundle, tokenizer, settings, device=device,
                            max_context=bundle.meta.get("max_context") or 2048, max_batch_tokens=max_batch_tokens,
                            image_cache=image_cache)


class ServerAgent(Responder):
    """Answers INFER_REQUEST and DECODE_STEP frames with the engine(s)."""

    def __init__(self, engine: GenerationEngine | list[GenerationEngine], broker: BrokerConfig,
                 group: str | None = DEFAULT_GROUP, client_id: str | None = None, max_batch: int = 16):
        """engine: one, or several server halves of different exports (routed by the
        fingerprint in each frame). max_batch: requests waiting together are answered in
        one batch of at most this many (1: one at a time)."""
        self.router = EngineRouter(engine if isinstance(engine, list) else [engine])
        super().__init__(broker, self.router.handle_batch, group=group, client_id=client_id, max_batch=max_batch)
        self.engine = next(iter(self.router.engines.values()))
        # decode steps come back to the server holding the KV cache; streamed tokens go out as they are made
        self.router.set_agent(self.server_id, self.emit)

    def stats(self) -> dict:
        return {"served": self.served, "batches": self.batches, "duplicates": self.duplicates,
                "open_sessions": len(self.router.sessions),
                "image_cache_hits": sum(e.images.hits for e in self.router.engines.values())}


def describe(engine: GenerationEngine | EngineRouter) -> str:
    if isinstance(engine, EngineRouter):
        return json.dumps({fp.hex(): json.loads(describe(e)) for fp, e in engine.engines.items()})
    s = engine.split
    return json.dumps({"cut": s.cut, "quantizer": s.quantizer, "levels": s.levels,
                       "fingerprint": engine.bundle.fingerprint[:16], "eos_token_ids": list(engine.settings.eos_token_ids),
                       "max_new_tokens": engine.settings.max_new_tokens,
                       "max_new_tokens_limit": engine.settings.max_new_tokens_limit})
