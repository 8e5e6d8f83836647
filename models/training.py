"""Training and evaluation of a split model on the shapes benchmark, in one process.

Every step goes through exactly the path the wire uses: the client emits integer
codes, the server dequantises them, computes the loss and the gradient with respect to
the dequantised values, and that gradient is applied to the client's normalised values
(straight-through estimator) together with the commitment loss.

The recipe (see docs/TRAINING.md for why):
  stage 1  alignment: the client half (vision tower, projector, client layers, quantizer
           encoder) learns, through a small probe on the dequantised codes at the image
           tokens, to carry each grid cell's colour and shape across the cut (LLaVA's
           first stage aligns a pretrained tower; the tiny preset's starts from scratch);
  stage 2  everything end to end through the quantizer, with the probe loss kept on at
           a lower weight, AdamW with warmup and cosine decay.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeqtl import scenes, shapes
from edgeqtl.imageproc import ImageSpec

from .batches import Batch, Collator, image_spec_of
from .checkpoint import save_checkpoint
from .evaluation import evaluate
from .quantizer import commitment_loss, dequantise, soft_rate_bits
from .split import SplitModel, UnsupportedModelError, kept_rows, sent_positions
from .steps import adamw, answer_loss, client_backward, lr_at, server_step


@dataclasses.dataclass
class TrainConfig:
    steps: int = 5500  # ~11 min on 2 cores: the benchmark's 15-minute budget with eval
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    commitment: float = 0.1
    # lambda of the rate term: the loss adds rate_weight x the codes' estimated bits per
    # element (quantizer.soft_rate_bits) over the positions that go up as codes
    rate_weight: float = 0.0
    vision_steps: int = 300
    vision_lr: float = 3e-3
    probe_weight: float = 0.3
    # Objects per image ramp from 1 to 4 over these first steps: with one object the
    # language model learns to read an object's attributes (one attention hop) before it
    # has to select among several (two hops), which it otherwise takes long to find.
    curriculum_steps: int = 600
    # Stage 1's probe: "cells" reads the world's scene labels (the tiny preset on shapes),
    # "pixels" redraws each image token's patch (any images: the default with --data).
    probe: str = "cells"
    # Sample families in proportion to their running training loss (floor 5% each), so
    # that solved families (count, early on) stop taking a fifth of every batch.
    adaptive_families: bool = True
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0


# --------------------------------------------------------------------------- batches


class ShapesCollator(Collator):
    """The shapes world's samples -> Batches, with its chat format and tokenizer."""

    def __init__(self, tokenizer, n_image_tokens: int, image_spec: ImageSpec):
        super().__init__(shapes.prompts(n_image_tokens, tokenizer), image_spec)


# --------------------------------------------------------------------------- the probe


class CellProbe(nn.Module):
    """Every image token predicts the colour (or none) and shape (or none) of the grid
    cell it lies in, and which cell that is. Per token, not pooled: then any one token
    of a cell carries the whole object and its place, and the language model can read
    them with a single attention hop (rotary positions alone tell it only distances)."""

    CLASSES = (1 + len(shapes.COLORS), 1 + len(shapes.SHAPES), shapes.GRID * shapes.GRID)

    def __init__(self, hidden: int, n_image_tokens: int):
        super().__init__()
        self.side = int(math.isqrt(n_image_tokens))
        if self.side ** 2 != n_image_tokens or self.side % shapes.GRID:
            raise ValueError("the cell probe needs a square patch grid divisible by the shapes grid")
        self.head = nn.Linear(hidden, sum(self.CLASSES))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B, N, H = feats.shape
        return self.head(feats).reshape(B, self.side, self.side, -1)  # (B, row, col, classes)

    def cell_of_token(self) -> torch.Tensor:
        k = self.side // shapes.GRID
        r = torch.arange(self.side) // k
        return r[:, None] * shapes.GRID + r[None, :]  # (side, side) -> cell index

    @staticmethod
    def targets(samples) -> tuple[torch.Tensor, torch.Tensor]:
        colors, shp = list(shapes.COLORS), list(shapes.SHAPES)
        c = torch.zeros(len(samples), shapes.GRID, shapes.GRID, dtype=torch.long)
        s = torch.zeros_like(c)
        for i, smp in enumerate(samples):
            for o in smp.objects:
                c[i, o.row, o.col] = 1 + colors.index(o.color)
                s[i, o.row, o.col] = 1 + shp.index(o.shape)
        return c, s

    def loss(self, feats, batch) -> torch.Tensor:
        samples = batch.samples
        out = self(feats).reshape(len(samples), self.side * self.side, -1)
        cell = self.cell_of_token().reshape(-1)
        tc, ts = (t.reshape(len(samples), -1)[:, cell] for t in self.targets(samples))
        targets = (tc, ts, cell.expand(len(samples), -1))
        logits = out.split(list(self.CLASSES), dim=-1)
        return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1)) for lg, t in zip(logits, targets))


class ObjectProbe(nn.Module):
    """The scenes world's probe: every image token predicts the colour, shape, digit and
    size class of the object over its patch (edgeqtl.scenes.token_labels; 0: none).
    Objects sit anywhere, so labels are per patch rather than per grid cell; where a
    token sits the rotary positions tell the language model."""

    def __init__(self, wire_dim: int, n_image_tokens: int):
        super().__init__()
        self.side = math.isqrt(n_image_tokens)
        if self.side ** 2 != n_image_tokens:
            raise ValueError("the object probe needs a square patch grid")
        self.classes = tuple(1 + n for _, n in scenes.TOKEN_LABELS)
        self.head = nn.Linear(wire_dim, sum(self.classes))

    def loss(self, feats, batch) -> torch.Tensor:
        samples = batch.samples
        targets = torch.from_numpy(np.stack([scenes.token_labels(s.scene, self.side) for s in samples]))
        targets = targets.reshape(len(samples), len(self.classes), -1)  # (B, labels, tokens), row-major
        logits = self.head(feats).split(list(self.classes), dim=-1)
        return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, i].reshape(-1))
                   for i, lg in enumerate(logits))


class PixelProbe(nn.Module):
    """Every image token redraws its own patch (at 8x8 pixels) from its wire values: a
    stage-1 target any image has, where no scene labels exist (a user's data). It makes
    the codes carry what the patch shows, so that the language model finds something
    to read when it learns to look at the image."""

    SIZE = 8

    def __init__(self, wire_dim: int, n_image_tokens: int):
        super().__init__()
        self.side = math.isqrt(n_image_tokens)
        self.head = nn.Sequential(nn.Linear(wire_dim, 256), nn.GELU(), nn.Linear(256, self.SIZE * self.SIZE * 3))

    def loss(self, feats, batch) -> torch.Tensor:
        pix, s, r = batch.pixel_values, self.side, self.SIZE
        target = F.adaptive_avg_pool2d(pix, (s * r, s * r)).reshape(len(pix), 3, s, r, s, r)
        target = target.permute(0, 2, 4, 3, 5, 1).reshape(len(pix), s * s, r * r * 3)  # row-major patches
        return F.mse_loss(self.head(feats), target)


# --------------------------------------------------------------------------- steps


def wire_values(model: SplitModel, out) -> torch.Tensor:
    """What the server will see (dequantised codes), differentiable for the client
    through the straight-through estimator. The probe reads these, so that object
    identity has to survive the quantizer, not only the projector."""
    if model.split.quantizer != "fsq":
        return out.values
    return out.values + (dequantise(out.wire, model.split.levels, out.values.dtype) - out.values).detach()


def image_positions(values: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, n_img: int) -> torch.Tensor:
    """(B, T, D) -> (B, n_img, D): the wire values at the image tokens, in order."""
    idx = (input_ids == image_token_id).long().argsort(dim=1, descending=True, stable=True)[:, :n_img]
    return torch.gather(values, 1, idx.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def wire_step(model: SplitModel, batch: Batch, commitment: float, client_aux=None) -> dict:
    """One forward/backward through the wire path, as split training takes it
    (models.steps): the server sees only the wire tensor and the attention mask, the
    client gets the gradient at the dequantised codes. Leaves gradients in both halves."""
    if model.split.exact_text:
        return exact_text_step(model, batch, commitment, client_aux)
    out = model.client(batch.input_ids, batch.attention_mask, batch.pixel_values, labels=batch.labels)
    # under FastV the wire holds fewer rows than the prompt: the labels of the rows sent
    step = server_step(model.server, model.server.receive(out.wire), kept_rows(batch.labels, out.rows),
                       out.attention_mask)
    commit = client_backward(out, step.grad, model.split, commitment, client_aux)
    return {"loss": step.loss, "commit": commit, "per_sample": step.per_sample}


def exact_text_step(model: SplitModel, batch: Batch, commitment: float, client_aux=None) -> dict:
    """wire_step for a split with `exact_text` (cut 0, the prompt as ids): the image
    positions reach the trunk through the codes, the text as its own embeddings, which
    the server takes from the ids with its copy of the table. One backward, in one
    process: split training refuses such a split (server_agent/training.py)."""
    h, e = model.client.through_layers(batch.input_ids, batch.attention_mask, batch.pixel_values)
    out = dataclasses.replace(model.client.to_wire(h), attention_mask=e.attention_mask,
                              image_positions=e.image_positions)
    is_image = batch.input_ids == model.client.image_token_id
    decoded = model.server.decoder_q(wire_values(model, out))
    logits = model.server.forward_hidden(model.server.with_exact_text(decoded, h, is_image), e.attention_mask)
    loss, per_sample, _ = answer_loss(logits, batch.labels)
    commit = commitment_loss(out.values[is_image], model.split.levels)  # the image's codes alone are sent
    objective = loss + commitment * commit + (client_aux(out) if client_aux is not None else 0.0)
    objective.backward()
    return {"loss": loss.item(), "commit": commit.item(), "per_sample": per_sample}


class FamilySampler:
    """Family mix per batch, in proportion to each family's running loss."""

    def __init__(self, families=shapes.FAMILIES, floor: float = 0.05, decay: float = 0.95):
        self.families = tuple(families)
        self.loss = {f: 1.0 for f in self.families}
        self.floor, self.decay = floor, decay

    def weights(self) -> np.ndarray:
        w = np.array([self.loss[f] for f in self.families])
        w = w / w.sum()
        w = np.maximum(w, self.floor)
        return w / w.sum()

    def mix(self, batch_size: int) -> tuple[str, ...]:
        """Deterministic: counts by largest remainder, in a fixed order."""
        w = self.weights() * batch_size
        counts = np.floor(w).astype(int)
        for i in np.argsort(-(w - counts))[: batch_size - counts.sum()]:
            counts[i] += 1
        return tuple(f for f, c in zip(self.families, counts) for _ in range(c))

    def update(self, categories, per_sample_loss) -> None:
        for f in self.families:
            vals = [l for c, l in zip(categories, per_sample_loss) if c == f]
            if vals:
                self.loss[f] = self.decay * self.loss[f] + (1 - self.decay) * float(np.mean(vals))


def max_objects_at(step: int, cfg: TrainConfig) -> int:
    full = shapes.GRID * shapes.GRID
    if step >= cfg.curriculum_steps:
        return full
    return 1 + (full * step) // cfg.curriculum_steps


# --------------------------------------------------------------------------- the loop


def train(model: SplitModel, source, cfg: TrainConfig, out_dir: str | Path | None = None,
          progress: bool = True, log=print, evaluator=None) -> list[dict]:
    """Train both halves from `source` (models.sources: a world's stream or a user's
    records). evaluator(model) -> one line, every cfg.eval_every steps. Returns the log."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    n_img = model.num_image_tokens
    reduction = model.image_reduction
    if reduction is not None and cfg.probe != "none" and not (cfg.probe == "pixels" and reduction.reducer == "pool"):
        # a pooled grid is still a grid; a chosen subset no longer maps token i to patch i
        raise UnsupportedModelError(f"the {cfg.probe} probe reads each image token's own patch, and with --reducer "
                         f"{reduction.reducer} the kept tokens are a subset: use --probe none (or --reducer pool "
                         "with --probe pixels)")
    wire_dim = model.split.code_dim if model.split.quantizer == "fsq" else model.hidden_size
    probe = make_probe(cfg.probe, wire_dim, n_img, source, log)
    image_id = model.client.image_token_id

    def probe_loss(out, batch):
        feats = image_positions(wire_values(model, out), batch.input_ids, image_id, n_img)
        return probe.loss(feats, batch)

    history: list[dict] = []
    model.train()

    # ---- stage 1: alignment. Everything on the client learns, through the probe on the
    # wire values, to put what each image token shows into its codes.
    if cfg.vision_steps > 0 and probe is not None:
        params = list(model.client.parameters()) + list(probe.parameters())
        opt = adamw(params, cfg.vision_lr, cfg.weight_decay)
        bar = tqdm(range(cfg.vision_steps), desc="stage 1 align", disable=not progress, dynamic_ncols=True)
        for step in bar:
            batch = source.align_batch(step)
            out = model.client(batch.input_ids, batch.attention_mask, batch.pixel_values)
            loss = probe_loss(out, batch)
            if model.split.quantizer == "fsq" and cfg.commitment > 0:
                loss = loss + cfg.commitment * commitment_loss(out.values, model.split.levels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = cfg.vision_lr * min(1.0, (step + 1) / 20)
            opt.step()
            bar.set_postfix(probe=f"{loss.item():.3f}")
            history.append({"stage": 1, "step": step, "probe": loss.item()})

    # ---- stage 2: end to end through the wire path
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    t0 = time.time()
    sampler = FamilySampler(source.categories)
    bar = tqdm(range(cfg.steps), desc="stage 2 split", disable=not progress, dynamic_ncols=True)
    for step in bar:
        mix = sampler.mix(cfg.batch_size) if cfg.adaptive_families else source.categories
        batch = source.batch(step, mix)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        rate = {}

        def aux(out, batch=batch):
            loss = cfg.probe_weight * probe_loss(out, batch) if cfg.probe_weight > 0 and probe else 0.0
            if cfg.rate_weight > 0 and model.split.quantizer == "fsq":
                r = soft_rate_bits(out.values[sent_positions(model, batch, out.rows)], model.split.levels)
                rate["bits"] = r.item()
                loss = loss + cfg.rate_weight * r
            return loss
        rec = wire_step(model, batch, cfg.commitment, aux)
        if rate:
            rec["rate_bits"] = rate["bits"]
        sampler.update([ex.category for ex in batch.examples], rec.pop("per_sample"))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        rec.update(stage=2, step=step, lr=opt.param_groups[0]["lr"], t=time.time() - t0)
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if evaluator is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            log(f"step {step + 1}: {evaluator(model)}")
            model.train()
        if out_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(model, out_dir, cfg, step + 1, extra={"world": source.name},
                            prompts=source.collate.prompts)
    model.eval()
    if out_dir is not None:
        save_checkpoint(model, out_dir, cfg, cfg.steps, extra={"world": source.name}, prompts=source.collate.prompts)
        (Path(out_dir) / "train_log.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")
    return history


def make_probe(kind: str, wire_dim: int, n_img: int, source, log=print):
    """The stage-1 probe: `cells` (the world's scene labels), `pixels` (each image
    token's own patch, from any image), or None."""
    if kind == "cells":
        if not source.has_scenes:
            raise ValueError("the cell probe needs a built-in world's scene labels; use --probe pixels with --data")
        return ObjectProbe(wire_dim, n_img) if source.name == "scenes" else CellProbe(wire_dim, n_img)
    if kind == "pixels":
        side = math.isqrt(n_img)
        if side * side != n_img:
            log(f"no pixel probe: {n_img} image tokens are not a square patch grid")
            return None
        return PixelProbe(wire_dim, n_img)
    if kind == "none":
        return None
    raise ValueError(f"probe must be cells, pixels or none, got {kind!r}")
