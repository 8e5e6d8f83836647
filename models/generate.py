"""Greedy generation with a split model in one process (KV caches on both halves), for
evaluation and for the teacher's answers in quantizer adaptation. The server agent's
own engine (server_agent/engine.py) does the same over the network.

    quantized=True   through the wire: client -> codes -> server (what a deployment answers)
    quantized=False  the client's hidden states straight into the trunk: the unsplit model
"""
from __future__ import annotations

import torch

from .batches import Batch
from .split import KVCache, SplitModel, last_positions


@torch.no_grad()
def generate(model: SplitModel, batch: Batch, max_new_tokens: int, eos_ids: set[int],
             quantized: bool = True) -> list[list[int]]:
    """Each row's generated token ids, up to and without the first end-of-sequence id."""
    c_cache, s_cache = KVCache(), KVCache()
    mask = batch.attention_mask
    logits = _step(model, batch.input_ids, mask, batch.pixel_values, c_cache, s_cache, quantized)
    rows = [[] for _ in range(mask.shape[0])]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                if t in eos_ids:
                    done[r] = True
                else:
                    rows[r].append(t)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = _step(model, tokens.unsqueeze(1), mask, None, c_cache, s_cache, quantized)
    return rows


def _step(model: SplitModel, ids, mask, pixels, c_cache: KVCache, s_cache: KVCache, quantized: bool):
    """The next token's logits (B, V)."""
    h = model.client.hidden(ids, mask, pixels, c_cache)
    if quantized:
        wire = model.client.to_wire(h).wire
        if not model.split.exact_text:
            return model.server.next_logits(wire, mask, s_cache)
        decoded = model.server.decoder_q(model.server.receive(wire))
        h = model.server.with_exact_text(decoded, h, ids == model.client.image_token_id)
    return model.server.forward_hidden(h, mask, s_cache, last_positions(h))[:, -1]
