"""The server agent: a GenerationEngine behind a Responder on the shared subscription.
Several agents on one broker split the fleet's requests between them."""
from __future__ import annotations

import json
from pathlib import Path

from edgeqtl.transport import DEFAULT_GROUP, BrokerConfig, Responder

from .engine import GenerationEngine


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_engine(server_half: str | Path, max_new_tokens: int = 8, device: str = "cpu", dtype: str | None = None,
                max_batch_tokens: int | None = None) -> GenerationEngine:
    """dtype: fp32 (the default on the CPU), bf16 (the default on CUDA) or fp16."""
    import torch
    from tokenizers import Tokenizer

    from edgeqtl.models.server_half import load_server_half

    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    bundle = load_server_half(server_half, getattr(torch, DTYPES[dtype]))
    tokenizer = Tokenizer.from_file(str(Path(server_half) / "tokenizer.json"))
    eos = bundle.meta.get("text", {}).get("eos_token_id", 0)
    return GenerationEngine(bundle, tokenizer, eos, max_new_tokens=max_new_tokens, device=device,
                            max_context=bundle.meta.get("max_context") or 2048, max_batch_tokens=max_batch_tokens)


class ServerAgent(Responder):
    """Answers INFER_REQUEST and DECODE_STEP frames with the engine."""

    def __init__(self, engine: GenerationEngine, broker: BrokerConfig, group: str | None = DEFAULT_GROUP,
                 client_id: str | None = None, max_batch: int = 16):
        """max_batch: requests waiting together are answered in one batch of at most this
        many (1: one at a time)."""
        super().__init__(broker, engine.handle_batch, group=group, client_id=client_id, max_batch=max_batch)
        self.engine = engine
        engine.server_id = self.server_id  # decode steps come back to the server holding the KV cache

    def stats(self) -> dict:
        return {"served": self.served, "batches": self.batches, "duplicates": self.duplicates,
                "open_sessions": len(self.engine.sessions)}


def describe(engine: GenerationEngine) -> str:
    s = engine.split
    return json.dumps({"cut": s.cut, "quantizer": s.quantizer, "levels": s.levels,
                       "fingerprint": engine.bundle.fingerprint[:16]})
