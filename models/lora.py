"""Low-rank adapters for quantizer adaptation (`edgeqtl train --model ... --trainable lora`):
y = W x + (alpha / r) B A x on the linear layers of the trunk's first layers after the
cut, where the quantizer's error enters. B starts at zero, so an adapted model starts
as the frozen one; `enabled(False)` gives back the frozen model (the teacher); `merge`
folds B A into W, so a saved or exported model is a plain checkpoint with no adapter."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.A.T @ self.B.T) * self.scale
        return y


def add_lora(layers, rank: int = 8, alpha: float = 16.0) -> list[LoRALinear]:
    """Wrap every nn.Linear inside `layers` (attention and MLP projections) in place."""
    adapters = []
    for layer in layers:
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(module, LoRALinear):
                    adapter = LoRALinear(child, rank, alpha)
                    setattr(module, child_name, adapter)
                    adapters.append(adapter)
    return adapters


@contextlib.contextmanager
def enabled(adapters: list[LoRALinear], on: bool):
    before = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = on
    try:
        yield
    finally:
        for a, was in zip(adapters, before):
            a.enabled = was


@torch.no_grad()
def merge(layers) -> int:
    """Fold every adapter in `layers` into its base weight and unwrap it; returns how many."""
    n = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, LoRALinear):
                    child.base.weight += (child.B @ child.A) * child.scale
                    setattr(module, child_name, child.base)
                    n += 1
    return n
