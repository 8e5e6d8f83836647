"""The learned quantizer at the cut (Quantized-TinyLLaVA, FSQ-style).

Device side (`QuantizerEncoder`): in_proj (hidden -> code_dim), robust per-token
normalisation (clip to mean +- c sigma, map to [-1, 1]), uniform rounding to L levels.

The clip range c depends on L. The original design's c = 3 (docs/ARCHITECTURE.md) suits
many levels, but at L = 4 it puts the outer levels at +-3 sigma and the thresholds at 0 and +-2 sigma: in a trained
2-bit model 97.5% of codes sat on the two middle levels (about 1.2 bits of the 2 sent),
and by Chebyshev no token can put more than a quarter of its dims beyond 2 sigma. The
default is the range of the uniform quantizer that is optimal for Gaussian values
(Max, 1960): c = 1.49 for L = 4, 2.05 for L = 8, 2.51 for L = 16, rising to 3 at
L = 64 and above. L = 2 is a sign, where c does not change the codes; it keeps 3 sigma,
so that almost no value is clipped (a clipped value gets no gradient).
Codes are integers in [0, L). No scale travels: the server's `QuantizerDecoder.out_proj`
(code_dim -> hidden) learns it.

Training goes through integer codes exactly as the wire does: the client emits codes
and the normalised values; the server dequantises the codes; the gradient with respect
to the dequantised values is applied to the normalised values (straight-through
estimator). A cosine commitment loss pulls normalised values towards their levels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLIP_SIGMAS = 3.0  # the original range (docs/ARCHITECTURE.md); what checkpoints saved without `clip_sigmas` used
EPS = 1e-6

# Outer level of the Gaussian-optimal uniform quantizer, in sigmas, by log2(L).
_GAUSS_RANGE = ((math.log2(3), 1.22), (2.0, 1.49), (3.0, 2.05), (4.0, 2.51), (5.0, 2.92), (6.0, 3.0))


def default_clip_sigmas(levels: int) -> float:
    if levels == 2:
        return CLIP_SIGMAS
    x = math.log2(levels)
    for (x0, y0), (x1, y1) in zip(_GAUSS_RANGE, _GAUSS_RANGE[1:]):
        if x <= x1:
            return round(y0 + (y1 - y0) * max(0.0, x - x0) / (x1 - x0), 3)
    return CLIP_SIGMAS


def normalise(z: torch.Tensor, clip_sigmas: float = CLIP_SIGMAS) -> torch.Tensor:
    """Per-token robust normalisation: clip to mean +- c sigma and map to [-1, 1]."""
    mu = z.mean(-1, keepdim=True)
    sigma = (z - mu).pow(2).mean(-1, keepdim=True).add(EPS).sqrt()
    return ((z - mu) / (clip_sigmas * sigma)).clamp(-1.0, 1.0)


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


def soft_rate_bits(n: torch.Tensor, levels: int, temperature: float = 0.25) -> torch.Tensor:
    """A differentiable estimate of the codes' rate, bits per element: each value's soft
    assignment to the L levels (a softmax over squared distances, in units of the level
    spacing, at `temperature`), averaged over the tokens into a per-dimension histogram,
    whose entropy is averaged over the dimensions. It is the same model export fits for
    the rANS coder (a static categorical per dimension), so lowering it lowers what the
    coder sends. n: (..., code_dim) normalised values in [-1, 1]."""
    flat = n.reshape(-1, n.shape[-1])
    grid = torch.linspace(-1.0, 1.0, levels, device=n.device, dtype=n.dtype)
    step = 2.0 / (levels - 1)
    logits = -((flat.unsqueeze(-1) - grid) / step).pow(2) / temperature
    marginal = torch.softmax(logits, dim=-1).mean(0)  # (code_dim, L)
    return -(marginal * torch.log2(marginal.clamp_min(1e-9))).sum(-1).mean()


class QuantizerEncoder(nn.Module):
    def __init__(self, hidden_size: int, code_dim: int, levels: int, clip_sigmas: float | None = None):
        super().__init__()
        if not 2 <= levels <= 256:
            raise ValueError(f"levels must be in [2, 256], got {levels}")
        self.levels = levels
        self.clip_sigmas = float(clip_sigmas if clip_sigmas is not None else default_clip_sigmas(levels))
        self.in_proj = nn.Linear(hidden_size, code_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes uint8, normalised values that the codes round)."""
        n = normalise(self.in_proj(h), self.clip_sigmas)
        return to_codes(n, self.levels), n


class QuantizerDecoder(nn.Module):
    def __init__(self, code_dim: int, hidden_size: int, levels: int):
        super().__init__()
        self.levels = levels
        self.out_proj = nn.Linear(code_dim, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Dequantised values in [-1, 1] -> hidden states for layer `cut`."""
        return self.out_proj(values)
