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
    mask = batch.attention_mask
    logits, mask = model.next_logits(batch.input_ids, mask, batch.pixel_values, c_cache, s_cache, quantized,
                                     with_mask=True)
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
        logits = model.next_logits(tokens.unsqueeze(1), mask, None, c_cache, s_cache, quantized)
    return rows

