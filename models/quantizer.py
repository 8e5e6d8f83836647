"""The learned quantizer at the cut (Quantized-TinyLLaVA, FSQ-style).

Device side (`QuantizerEncoder`): in_proj (hidden -> code_dim), robust per-token
normalisation (clip to mean +- 3 sigma, map to [-1, 1]), uniform rounding to L levels.
Codes are integers in [0, L). No scale travels: the server's `QuantizerDecoder.out_proj`
(code_dim -> hidden) learns it.

Training goes through integer codes exactly as the wire does: the client emits codes
and the normalised values; the server dequantises the codes; the gradient with respect
to the dequantised values is applied to the normalised values (straight-through
estimator). A cosine commitment loss pulls normalised values towards their levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_SIGMAS = 3.0
EPS = 1e-6


def normalise(z: torch.Tensor) -> torch.Tensor:
    """Per-token robust normalisation: clip to mean +- 3 sigma and map to [-1, 1]."""
    mu = z.mean(-1, keepdim=True)
    sigma = (z - mu).pow(2).mean(-1, keepdim=True).add(EPS).sqrt()
    return ((z - mu) / (CLIP_SIGMAS * sigma)).clamp(-1.0, 1.0)


def to_codes(n: torch.Tensor, levels: int) -> torch.Tensor:
    """Values in [-1, 1] -> integer codes in [0, levels) (uint8)."""
    return torch.round((n + 1.0) * (0.5 * (levels - 1))).to(torch.uint8)


def dequantise(codes: torch.Tensor, levels: int, dtype=torch.float32) -> torch.Tensor:
    """Integer codes -> the level values in [-1, 1] they stand for."""
    return codes.to(dtype) * (2.0 / (levels - 1)) - 1.0


def commitment_loss(n: torch.Tensor, levels: int) -> torch.Tensor:
    """Cosine commitment: 1 - cos(n, sg(level of n)), averaged over tokens."""
    target = dequantise(to_codes(n, levels), levels, n.dtype).detach()
    return (1.0 - F.cosine_similarity(n, target, dim=-1, eps=EPS)).mean()


class QuantizerEncoder(nn.Module):
    def __init__(self, hidden_size: int, code_dim: int, levels: int):
        super().__init__()
        if not 2 <= levels <= 256:
            raise ValueError(f"levels must be in [2, 256], got {levels}")
        self.levels = levels
        self.in_proj = nn.Linear(hidden_size, code_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes uint8, normalised values that the codes round)."""
        n = normalise(self.in_proj(h))
        return to_codes(n, self.levels), n


class QuantizerDecoder(nn.Module):
    def __init__(self, code_dim: int, hidden_size: int, levels: int):
        super().__init__()
        self.levels = levels
        self.out_proj = nn.Linear(code_dim, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Dequantised values in [-1, 1] -> hidden states for layer `cut`."""
        return self.out_proj(values)
