"""The torch step of split training, in one place: in-process training
(models/training.py) and networked split training (server_agent/training.py on the
server, models/device_training.py on the device) both call these, so the two cannot
drift apart.

    server_step      dequantised values, labels, mask -> loss, d loss / d values, metrics
                     (the server half's parameter gradients are left in place)
    trunk_forward    label-private training, on the server: the trunk's hidden states at
                     the output positions (the graph kept for the backward)
    head_step        label-private training, on the device: those hidden states through
                     its norm and lm_head -> loss, d loss / d hidden states, metrics
    client_backward  that gradient through the straight-through estimator, plus the
                     commitment loss (and any loss the client computes on its own output)
                     -> the client half's parameter gradients
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from edgeqtl.wire import IGNORE_LABEL

from .quantizer import commitment_loss


@dataclasses.dataclass
class SplitTrainConfig:
    """Networked split training: what the server and every device agree on."""

    steps: int = 1000  # per device
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    commitment: float = 0.1
    curriculum_steps: int = 0
    grad_codec: str = "int8"  # "fp16", "int8", "int4", or "fp32" (in process only: no compression)
    trainable: tuple[str, ...] = ("projector", "encoder")
    checkpoint_every: int = 100
    fedavg_every: int = 0  # 0: off
    # fedavg rounds with K of the N devices (0: all); "random": a seeded choice per round,
    # "first": the first K to send; a round closes round_deadline_s after it opened with
    # the weights it has (0: no deadline)
    devices_per_round: int = 0
    sampling: str = "random"
    round_deadline_s: float = 0.0
    # U-shaped split: the device keeps norm, lm_head, labels and loss (docs/TRAINING.md)
    private_labels: bool = False
    hidden_codec: str = "int8"  # the trunk's hidden states going down, and their gradient going up
    seed: int = 0


@dataclasses.dataclass
class ServerStep:
    loss: float
    grad: torch.Tensor  # d loss / d values: what goes back to the device
    per_sample: list[float]  # mean loss of each sample's answer tokens
    token_accuracy: float  # answer tokens predicted right (teacher forced)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float], float]:
    """(the mean cross-entropy over the answer tokens (labels != IGNORE_LABEL), each
    sample's mean, the answer tokens predicted right (teacher forced))."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_LABEL, reduction="none").view(logits.shape[0], -1)
    answer = targets != IGNORE_LABEL
    loss = per_token.sum() / answer.sum()
    with torch.no_grad():
        per_sample = (per_token.sum(1) / answer.sum(1).clamp(min=1)).tolist()
        correct = ((logits[:, :-1].argmax(-1) == targets) & answer).sum().item()
    return loss, per_sample, correct / max(1, int(answer.sum()))


def server_step(server, values: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> ServerStep:
    """Forward and backward through the server half from the wire values; the loss is
    answer_loss's."""
    values = values.detach().requires_grad_(True)
    loss, per_sample, accuracy = answer_loss(server.forward_values(values, attention_mask), labels)
    loss.backward()
    return ServerStep(loss.item(), values.grad, per_sample, accuracy)


def trunk_forward(server, values: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
    """(values as a leaf that takes a gradient, the trunk's hidden states at `positions`,
    (N, hidden) in row-major order)."""
    values = values.detach().requires_grad_(True)
    return values, server.trunk(values, attention_mask)[positions]


def head_step(norm, lm_head, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> ServerStep:
    """The loss on the device: hidden (N, hidden) from the trunk, targets (N,) the next
    tokens, rows (N,) each one's sample. Leaves the head's gradients in place; `grad` is
    d loss / d hidden, what goes back up. The same loss as server_step's."""
    hidden = hidden.detach().requires_grad_(True)
    logits = lm_head(norm(hidden))
    per_token = F.cross_entropy(logits, targets, reduction="none")
    loss = per_token.mean()
    loss.backward()
    with torch.no_grad():
        per_sample = [] if rows is None else [per_token[rows == r].mean().item() for r in torch.unique(rows)]
        correct = (logits.argmax(-1) == targets).sum().item()
    return ServerStep(loss.item(), hidden.grad, per_sample, correct / max(1, len(targets)))


def client_backward(out, grad: torch.Tensor, split, commitment: float, aux=None) -> float:
    """Backward through the client half: d loss / d (normalised values) := grad (the
    straight-through estimator), plus `commitment` x the cosine commitment loss and
    `aux(out)` (a loss the client computes on its own output). Returns the commitment loss."""
    objective = (out.values * grad.to(out.values.dtype)).sum()
    commit = 0.0
    if split.quantizer == "fsq" and commitment > 0:
        c = commitment_loss(out.values, split.levels)
        objective = objective + commitment * c
        commit = c.item()
    if aux is not None:
        objective = objective + aux(out)
    objective.backward()
    return commit


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norms (parameters of fewer than 2 dims)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr (cfg: any config with lr,
    warmup, steps and min_lr_ratio)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
