"""Quantizer adaptation for a pretrained VLM (`edgeqtl train --model CKPT --data FILE`).

The VLM stays frozen. A fresh quantizer (the device's encoder, the server's decoder)
learns by self-distillation: on the same inputs, the split model's next-token
distribution should match the unsplit model's (the same frozen weights, without the
quantizer: the teacher). The loss, over the answer positions only:

    KL(teacher || student) at temperature T, x T^2
    + ce_weight x cross-entropy on the answer, for records that have one
    + recon_weight x the decoder's output against the teacher's hidden states, every
      quantized token
    + commitment x the quantizer's cosine commitment loss

A record without an answer is answered once by the teacher (greedy, cached), and its
KL is taken over that answer. `trainable` opens more than the quantizer: the projector
(the teacher keeps a frozen copy) and LoRA adapters on the first trunk layers after the
cut (models/lora.py; switched off for the teacher, merged into the weights when saved).

At cut 0 the split is `exact_text` (models/split.py): the prompt's ids go up anyway, so
the trunk gets the text's own embeddings, as it did in pretraining, and the codes carry
the image alone.

The quantizer starts warm: a square in_proj starts as the identity, and the decoder as
the least-squares map from the codes back to the hidden states of a first batch, so
that the first steps refine a working split instead of finding one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeqtl.memory import peak_rss_mb
from edgeqtl.prompt import ASSISTANT

from . import lora
from .batches import Batch, Collator, Example
from .checkpoint import save_checkpoint
from .generate import generate
from .quantizer import commitment_loss, dequantise
from .split import SplitModel, kept_rows
from .steps import adamw, lr_at

TRAINABLE = ("quantizer", "projector", "lora")


@dataclasses.dataclass
class AdaptConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    commitment: float = 0.1
    ce_weight: float = 0.5
    # The decoder's output against the teacher's hidden states at every token (normalised
    # MSE): a dense signal beside the KL, which speaks only at the answer positions.
    recon_weight: float = 1.0
    temperature: float = 1.0
    trainable: tuple[str, ...] = ("quantizer",)
    lora_rank: int = 8
    lora_layers: int = 2  # trunk layers after the cut that get adapters
    checkpointing: bool = True  # recompute the trunk's activations in backward (real-size memory)
    bf16: bool = False  # bf16 autocast for the forward passes
    max_new_tokens: int = 16  # the teacher's answers to records without one
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0  # held-out figures every N steps (with --eval-data)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, valid, targets), each (B, P): the positions whose logits predict an
    answer token (the one before each label), padded to the longest row."""
    hits = [(row[1:] != -100).nonzero().squeeze(-1) for row in labels]
    P = max(1, max(len(h) for h in hits))
    positions = torch.zeros(len(hits), P, dtype=torch.long)
    valid = torch.zeros(len(hits), P, dtype=torch.bool)
    targets = torch.zeros(len(hits), P, dtype=torch.long)
    for i, h in enumerate(hits):
        positions[i, :len(h)] = h
        valid[i, :len(h)] = True
        targets[i, :len(h)] = labels[i, h + 1]
    return positions, valid, targets


class TeacherAnswers:
    """The unsplit model's greedy answers to records without one, generated once."""

    def __init__(self, model: SplitModel, collate: Collator, max_new_tokens: int, eos_ids: set[int]):
        self.model, self.collate = model, collate
        self.max_new_tokens, self.eos_ids = max_new_tokens, eos_ids
        self.cache: dict[str, str] = {}

    def complete(self, examples: list[Example]) -> list[Example]:
        todo = [ex for ex in examples if ex.answer is None and _key(ex) not in self.cache]
        if todo:
            batch = self.collate(todo, with_answer=False)
            for ex, ids in zip(todo, generate(self.model, batch, self.max_new_tokens, self.eos_ids, quantized=False)):
                self.cache[_key(ex)] = self.collate.prompts.tok.decode(ids)
        return [ex if ex.answer is not None else
                dataclasses.replace(ex, turns=[*ex.turns, (ASSISTANT, self.cache[_key(ex)])], category=ex.category)
                for ex in examples]


def _key(ex: Example) -> str:
    return getattr(ex.source, "id", None) or str(id(ex.source))


def quantized_positions(model: SplitModel, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the positions whose hidden states the trunk gets through the codes
    (under `exact_text`, the image positions alone); rows: those the client sent
    (FastV, which needs cut > 0 and so never has exact_text)."""
    keep = kept_rows(batch.attention_mask, rows).bool()
    if model.split.exact_text:
        keep = keep & (batch.input_ids == model.client.image_token_id)
    return keep


@torch.no_grad()
def warm_start(model: SplitModel, batch: Batch) -> None:
    """A square in_proj as the identity; the decoder as the least-squares map from the
    dequantised codes of `batch` back to its hidden states. (Whitening the hidden states
    instead was measured worse: per-token normalisation then divides by the noise of the
    small axes, blown up to unit variance.)"""
    enc, dec = model.client.encoder, model.server.decoder_q
    if enc is None:
        return
    if enc.in_proj.in_features == enc.in_proj.out_features:
        enc.in_proj.weight.copy_(torch.eye(enc.in_proj.in_features))
        enc.in_proj.bias.zero_()
    h, e = model.client.through_layers(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                       labels=batch.labels)
    codes, _ = enc(h)
    keep = quantized_positions(model, batch, e.rows)
    z = dequantise(codes, model.split.levels)[keep]
    z1 = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    sol = torch.linalg.lstsq(z1.double(), h[keep].double()).solution.float()  # (code_dim + 1, hidden)
    dec.out_proj.weight.copy_(sol[:-1].T)
    dec.out_proj.bias.copy_(sol[-1])


class Adapter:
    """The adaptation run: which parameters train, the teacher, one step."""

    def __init__(self, model: SplitModel, collate: Collator, cfg: AdaptConfig, eos_ids: set[int]):
        unknown = set(cfg.trainable) - set(TRAINABLE)
        if unknown:
            raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {TRAINABLE}")
        if model.split.quantizer != "fsq":
            raise ValueError("quantizer adaptation needs a quantized split (--bits or --levels)")
        self.model, self.collate, self.cfg = model, collate, cfg
        for p in model.parameters():
            p.requires_grad_(False)
        params = [*model.client.encoder.parameters(), *model.server.decoder_q.parameters()]
        self.teacher_projector = None
        if "projector" in cfg.trainable:
            self.teacher_projector = copy.deepcopy(model.client.projector)
            params += list(model.client.projector.parameters())
        self.adapters: list[lora.LoRALinear] = []
        if "lora" in cfg.trainable:
            self.adapters = lora.add_lora(model.server.layers[:cfg.lora_layers], cfg.lora_rank)
            params += [p for a in self.adapters for p in (a.A, a.B)]
        for p in params:
            p.requires_grad_(True)
        self.params = params
        self.opt = adamw(params, cfg.lr, cfg.weight_decay)
        self.teacher = TeacherAnswers(model, collate, cfg.max_new_tokens, eos_ids)

    @contextlib.contextmanager
    def as_teacher(self):
        """The frozen model: the original projector, no adapters."""
        saved = self.model.client.projector
        if self.teacher_projector is not None:
            self.model.client.projector = self.teacher_projector
        try:
            with lora.enabled(self.adapters, False):
                yield
        finally:
            self.model.client.projector = saved

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.bf16 else contextlib.nullcontext()

    def step(self, step: int, examples: list[Example]) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        real = torch.tensor([ex.answer is not None for ex in examples])
        with self.as_teacher():
            examples = self.teacher.complete(examples)
        batch = self.collate(examples)
        same = None  # rows whose student kept the teacher's image tokens (None: all rows)
        with torch.no_grad(), self._autocast(), self.as_teacher():
            h_teacher, e = model.client.through_layers(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                                       labels=batch.labels)
            # the rows sent: under FastV fewer than the prompt's, so the answer positions move
            pos, valid, targets = answer_positions(kept_rows(batch.labels, e.rows))
            mask = e.attention_mask
            t_logits = model.server.forward_hidden(h_teacher, mask, positions=pos).float()
        with self._autocast():
            if self.teacher_projector is None:
                h = h_teacher
            else:  # a reducer may keep other tokens of the trained projector's features: its own mask, then
                h, e_s = model.client.through_layers(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                                     labels=batch.labels)
                mask = e_s.attention_mask
                if e.image_positions is not None:  # compare the hidden states only where both kept the same tokens
                    same = (e_s.image_positions == e.image_positions).all(1)
            codes, n = model.client.encoder(h)
            values = n + (dequantise(codes, model.split.levels, n.dtype) - n).detach()  # straight through
            h_hat = model.server.with_exact_text(model.server.decoder_q(values), h,
                                                 batch.input_ids == model.client.image_token_id)
            s_logits = model.server.forward_hidden(h_hat, mask, positions=pos, checkpointing=cfg.checkpointing).float()
        keep = quantized_positions(model, batch, e.rows)
        if same is not None:
            keep = keep & same.unsqueeze(1)
        target = h_teacher[keep].float()
        recon = (F.mse_loss(h_hat[keep].float(), target) / target.var().clamp(min=1e-8) if keep.any()
                 else h_hat.new_zeros(()))
        T = cfg.temperature
        t_logp, s_logp = F.log_softmax(t_logits / T, -1), F.log_softmax(s_logits / T, -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[valid].mean() * T * T
        ce_mask = valid & real[:, None]
        ce = F.cross_entropy(s_logits[ce_mask], targets[ce_mask]) if ce_mask.any() else kl.new_zeros(())
        commit = commitment_loss(n.float(), model.split.levels)
        loss = kl + cfg.ce_weight * ce + cfg.commitment * commit + cfg.recon_weight * recon
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            agree = (t_logits.argmax(-1) == s_logits.argmax(-1))[valid].float().mean().item()
        return {"step": step, "loss": loss.item(), "kl": kl.item(), "ce": ce.item(), "commit": commit.item(),
                "recon": recon.item(), "top1_agreement": agree}

    def finish(self) -> None:
        """Fold the adapters into the trunk's weights (a plain checkpoint to save and export)."""
        if self.adapters:
            lora.merge(self.model.server.layers[:self.cfg.lora_layers])
            self.adapters = []
        self.model.eval()


def adapt(model: SplitModel, collate: Collator, batches, cfg: AdaptConfig, eos_ids: set[int],
          out_dir: str | Path | None = None, progress: bool = True, log=print, on_eval=None,
          eval_every: int = 0) -> list[dict]:
    """`batches`: an endless iterator of Example lists (cfg.batch_size each). Returns the
    per-step log; prints seconds per step and peak RSS at the end."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    run = Adapter(model, collate, cfg, eos_ids)
    batches = iter(batches)
    first = next(batches)
    with run.as_teacher():
        warm_start(model, collate(run.teacher.complete(first)))
    history, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="adapt quantizer", disable=not progress, dynamic_ncols=True)
    examples = first
    for step in bar:
        rec = run.step(step, examples)
        rec["t"] = time.time() - t0
        history.append(rec)
        bar.set_postfix(kl=f"{rec['kl']:.3f}", agree=f"{100 * rec['top1_agreement']:.0f}%",
                        rss=f"{peak_rss_mb():.0f}M")
        if on_eval is not None and eval_every and (step + 1) % eval_every == 0:
            on_eval(step + 1)
        if out_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                and not run.adapters:  # with adapters the model is saved at the end, merged
            save_checkpoint(model, out_dir, cfg, step + 1, extra={"adapted": True}, prompts=collate.prompts)
        if step + 1 < cfg.steps:
            examples = next(batches)
    bar.close()
    run.finish()
    seconds = (time.time() - t0) / max(1, cfg.steps)
    log(f"adapted the quantizer in {cfg.steps} steps: {seconds:.2f} s per step, peak RSS {peak_rss_mb():.0f} MB")
    if out_dir is not None:
        save_checkpoint(model, out_dir, cfg, cfg.steps, extra={"adapted": True, "seconds_per_step": seconds},
                        prompts=collate.prompts)
    return history
