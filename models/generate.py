"""Greedy generation with a split model in one process (KV caches on both halves), for
evaluation and for the teacher's answers in quantizer adaptation. The server agent's
own engine (server_agent/engine.py) does the same over the network.

    quantized=True   through the wire: client -> codes -> server (what a deployment answers)
    quantized=False  the client's hidden states straight into the trunk: the unsplit model
"""
from __future__ import annotations

import torch

from .batches import Batch
from .split import KVCache, SplitModel


@torch.no_grad()
def generate(model: SplitModel, batch: Batch, max_new_tokens: int, eos_ids: set[int],
             quantized: bool = True) -> list[list[int]]:
    """Each row's generated token ids, up to and without the first end-of-sequence id."""
    c_cache, s_cache = KVCache(), KVCache()
    # each half extends its own mask: the server's has the image's position steps, and
    # under FastV fewer image tokens than the device's layers saw
    logits, c_mask, s_mask = model.next_logits(batch.input_ids, batch.attention_mask, batch.pixel_values, c_cache,
                                               s_cache, quantized, with_mask=True)
    rows = [[] for _ in range(logits.shape[0])]
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
        c_mask, s_mask = (torch.cat([m, m.new_ones(m.shape[0], 1)], dim=1) for m in (c_mask, s_mask))
        logits = model.next_logits(tokens.unsqueeze(1), c_mask, None, c_cache, s_cache, quantized, server_mask=s_mask)
    return rows

