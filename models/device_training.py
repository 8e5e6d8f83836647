"""The device side of split training (`edgeqtl device train`): the device's images never
leave it; its client half sends codes up and applies the compressed gradient that comes
back. Needs torch (autograd), unlike device inference, which never imports this module.

    ShapesShard, RecordBatches   where its batches come from: a shard of the shapes
                                 world, or its own data file
    DeviceTrainer   the client half (and, label-private, the head), its optimizer and
                    checkpoints
    run_device      the loop: request -> link -> apply, fedavg rounds, checkpoints

The server side and the exactly-once rules are in server_agent/training.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from edgeqtl import shapes
from edgeqtl.errors import CodedError
from edgeqtl.wire import (Frame, FrameKind, array_part, codes_part, encode_frame, gradient_part, hidden_part_of,
                          json_frame, json_part, new_request_id, output_positions, raise_if_error, tensors_frame,
                          train_request_frame, trunk_request_frame)
from edgeqtl.errors import RemoteError
from edgeqtl.models.checkpoint import device_state_name, load_optimizer, load_state, optimizer_tensors, save_state
from edgeqtl.models.split import kept_rows
from edgeqtl.models.steps import SplitTrainConfig, adamw, client_backward, head_step, lr_at
from edgeqtl.models.training import ShapesCollator, image_spec_of, max_objects_at

TRAINABLE_CHOICES = ("projector", "encoder", "vision_tower", "layers", "embed_tokens")
HEAD = "head."  # label-private: the names of the device's norm and lm_head (the server half's, held here)


class ShapesShard:
    """Batches from this device's shard of the shapes world (tests and benchmarks): its
    own image stream, a family mix that is IID or Dirichlet(alpha) across devices."""

    def __init__(self, model, tokenizer, cfg: SplitTrainConfig, device_index: int = 0, num_devices: int = 1,
                 alpha: float | None = None):
        self.collate = ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model))
        self.cfg, self.index = cfg, device_index
        self.mix = shapes.family_mix(device_index, num_devices, alpha, cfg.seed)

    def __call__(self, step: int):
        cfg = self.cfg
        return self.collate(shapes.shard_batch(cfg.seed, self.index, step, cfg.batch_size, self.mix,
                                               max_objects_at(step, cfg)))


class RecordBatches:
    """Batches from the device's own data file (LLaVA records, edgeqtl.data): it never
    leaves the device; the server sees codes, the mask and the answer tokens' ids."""

    def __init__(self, collate, records, batch_size: int, seed: int = 0):
        from edgeqtl.data import RecordLoader

        self.collate = collate
        self.loader = RecordLoader(records, batch_size, seed=seed)

    def __call__(self, step: int):
        from edgeqtl.models.batches import record_example

        return self.collate([record_example(r, image) for r, image in self.loader.batch(step)])


class DeviceTrainer:
    """The device side: its data, the client half, its optimizer and checkpoints.
    `batches(step) -> Batch` gives batch `step` (0-based) of the device's data: a
    ShapesShard or RecordBatches (deterministic, so a restarted device replays exactly)."""

    def __init__(self, model, batches, cfg: SplitTrainConfig, device_id: str, state_dir: str | Path | None = None,
                 fingerprint: bytes = bytes(16)):
        unknown = set(cfg.trainable) - set(TRAINABLE_CHOICES)
        if unknown:
            raise CodedError("bad_config", f"unknown trainable parts {sorted(unknown)}; choose from "
                                           f"{TRAINABLE_CHOICES}")
        self.model = model
        self.client = model.client.train()
        self.cfg = cfg
        self.device_id = device_id
        self.batches = batches
        for p in self.client.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in self.client.named_parameters() if n.split(".")[0] in cfg.trainable]
        params = dict(self.client.named_parameters())
        self.private = cfg.private_labels
        if self.private:  # the head trains here; the server never sees the labels or the loss
            srv = model.server
            self.head = (srv.norm, srv.lm_head)
            head = {f"{HEAD}norm.{n}": p for n, p in srv.norm.named_parameters()}
            head.update({f"{HEAD}lm_head.{n}": p for n, p in srv.lm_head.named_parameters()})
            self.names += list(head)
            params.update(head)
        self._named = params
        self.params = [params[n] for n in self.names]
        # the hidden states' gradient codec rounds stochastically: seeded, and checkpointed, so
        # that a restarted device sends what it sent before
        self.rng = np.random.default_rng([cfg.seed, zlib.crc32(device_id.encode())])
        for p in self.params:
            p.requires_grad_(True)
        if not self.params:
            raise CodedError("bad_config", f"nothing to train on the device: {cfg.trainable} match no parameters")
        self.opt = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.fingerprint = fingerprint
        self.step = 0  # steps applied
        self.ckpt_step = 0
        self.bytes_up = self.bytes_down = 0
        self.fp16_up = self.fp16_down = 0
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self._restore()

    def request(self, step: int) -> tuple[Frame, object, object]:
        """The TRAIN_REQUEST (label-private: TRUNK_REQUEST) of `step` (1-based), with what
        the update needs."""
        batch = self.batches(step - 1)
        out = self.client(batch.input_ids, batch.attention_mask, batch.pixel_values, labels=batch.labels)
        if out.rows is not None:  # FastV sent fewer rows than the prompt's: their labels
            batch = dataclasses.replace(batch, labels=kept_rows(batch.labels, out.rows))
        if self.model.split.quantizer == "fsq":
            wire = codes_part(out.wire.numpy(), self.model.split.levels)
        else:
            wire = array_part(out.wire.detach().numpy().astype(np.float16))
        # the server keeps the replies after ckpt_step, for a restart from the checkpoint to replay;
        # a device without checkpoints cannot replay, and says so
        ckpt = self.ckpt_step if self.state_dir is not None else step - 1
        ids = dict(request_id=new_request_id(), fingerprint=self.fingerprint, step=step, device_id=self.device_id)
        # the mask the server half takes: with position steps where a reduced image keeps its positions
        mask = out.attention_mask.numpy()
        if self.private:  # no answer ids: only where the head needs hidden states back
            frame = trunk_request_frame(wire, mask, output_positions(batch.labels.numpy()), ckpt, **ids)
        else:
            frame = train_request_frame(wire, batch.labels.numpy(), mask, ckpt, **ids)
        return frame, out, batch

    def head_gradient(self, step: int, batch, reply: Frame) -> tuple[Frame, dict]:
        """Label-private: the trunk's hidden states through the device's head. Leaves the
        head's gradients in place; returns the HEAD_GRADIENT to send and the metrics."""
        raise_if_error(reply)
        if reply.step != step:
            raise CodedError("protocol", f"expected the TRUNK_HIDDEN of step {step}, got step {reply.step}")
        labels = batch.labels
        positions = torch.from_numpy(output_positions(labels.numpy()))
        targets = torch.roll(labels, -1, dims=1)[positions]
        hidden = torch.from_numpy(hidden_part_of(reply, FrameKind.TRUNK_HIDDEN, rows=len(targets)))
        if hidden.shape[1] != self.model.hidden_size:
            raise CodedError("bad_shape", f"hidden states of width {hidden.shape[1]}, the model's is "
                                          f"{self.model.hidden_size}")
        self.opt.zero_grad(set_to_none=True)
        rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)[positions]
        res = head_step(*self.head, hidden, targets, rows)
        g = res.grad.numpy()
        part = array_part(g.astype(np.float32)) if self.cfg.hidden_codec == "fp32" else \
            gradient_part(g, self.cfg.hidden_codec, self.rng)
        frame = tensors_frame(FrameKind.HEAD_GRADIENT, [part, json_part({})], request_id=new_request_id(),
                              fingerprint=self.fingerprint, step=step, device_id=self.device_id)
        return frame, {"loss": res.loss, "token_accuracy": res.token_accuracy}

    def apply(self, step: int, out, reply: Frame, zero_grad: bool = True) -> dict:
        raise_if_error(reply)
        if reply.kind != FrameKind.GRADIENT or reply.step != step:
            raise CodedError("protocol", f"expected the GRADIENT of step {step}, got {reply.kind.name} "
                                         f"of step {reply.step}")
        g_part, info = reply.parts()
        grad = torch.from_numpy(np.array(g_part.array(), dtype=np.float32))  # a writable copy
        if grad.shape != out.values.shape:
            raise CodedError("bad_shape", f"gradient {list(grad.shape)} for values {list(out.values.shape)}")
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step - 1, self.cfg)
        if zero_grad:  # label-private: the head's gradients are already in place
            self.opt.zero_grad(set_to_none=True)
        client_backward(out, grad, self.model.split, self.cfg.commitment)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.step = step
        return info.json()

    def train_step(self, step: int, link) -> dict:
        """One whole step over `link`: one exchange, or two when label-private."""
        frame, out, batch = self.request(step)
        if not self.private:
            reply = link.request(frame)
            info = self.apply(step, out, reply)
            self.count_bytes([frame], [reply])
            return info
        for _ in range(3):  # a server restarted between the two exchanges asks for the first again
            hidden = link.request(frame)
            head, metrics = self.head_gradient(step, batch, hidden)
            reply = link.request(head)
            if reply.kind == FrameKind.ERROR and reply.json().get("code") == "resubmit":
                frame = dataclasses.replace(frame, request_id=new_request_id())  # a new request, not a retry
                continue
            info = self.apply(step, out, reply, zero_grad=False)
            self.count_bytes([frame, head], [hidden, reply])
            return {**info, **metrics}
        raise RemoteError("resubmit", f"step {step}: the server lost the trunk pass three times")

    def count_bytes(self, sent: list[Frame], received: list[Frame]) -> None:
        """Wire bytes of a step both ways, frames whole, and the same frames carrying 16-bit
        tensors instead (hidden states and gradients of them: the unquantized split)."""
        for frames, fp16 in ((sent, "up"), (received, "down")):
            for f in frames:
                n = len(encode_frame(f))
                setattr(self, f"bytes_{fp16}", getattr(self, f"bytes_{fp16}") + n)
                part = f.parts()[0] if f.kind != FrameKind.ERROR else None
                if part is not None and len(part.shape) >= 2:  # codes: one hidden state per position; else the tensor itself
                    elements = math.prod(part.shape[:-1]) * self.model.hidden_size
                    n += elements * 2 - len(part.payload)
                setattr(self, f"fp16_{fp16}", getattr(self, f"fp16_{fp16}") + n)

    # ---------------------------------------------------------------- fedavg
    def flat_weights(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).numpy().astype(np.float32)

    def load_flat_weights(self, flat: np.ndarray) -> None:
        if flat.shape != (sum(p.numel() for p in self.params),):
            raise CodedError("bad_shape", "averaged weights do not fit this device's trainable parameters")
        off = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(torch.from_numpy(flat[off: off + p.numel()].copy()).view_as(p))
                off += p.numel()

    # ---------------------------------------------------------------- checkpoint
    def save(self) -> None:
        if self.state_dir is None:
            return
        opt_t, opt_meta = optimizer_tensors(self.opt)
        tensors = {**{f"client.{n}": self._named[n] for n in self.names}, **opt_t}
        save_state(self.state_dir / device_state_name(self.device_id), tensors,
                   {"step": self.step, "optimizer": opt_meta, "names": self.names, "rng": self.rng.bit_generator.state,
                    "bytes": [self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down]})
        self.ckpt_step = self.step

    def _restore(self) -> None:
        loaded = load_state(self.state_dir / device_state_name(self.device_id))
        if loaded is None:
            return
        tensors, meta = loaded
        if meta["names"] != self.names:
            raise CodedError("bad_checkpoint", "the checkpoint trained other parameters; use the same --trainable")
        with torch.no_grad():
            for n in self.names:
                self._named[n].copy_(tensors[f"client.{n}"])
        load_optimizer(self.opt, tensors, meta["optimizer"])
        if "rng" in meta:
            self.rng.bit_generator.state = meta["rng"]
        self.step = self.ckpt_step = meta["step"]
        self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down = meta["bytes"]


def run_device(trainer: DeviceTrainer, link, on_step=None, fetch_poll_s: float = 0.05,
               fetch_timeout_s: float = 600.0) -> None:
    """Train until cfg.steps; `link.request(frame) -> reply` (device_agent.links)."""
    cfg = trainer.cfg
    while trainer.step < cfg.steps:
        step = trainer.step + 1
        info = trainer.train_step(step, link)
        if cfg.fedavg_every and step % cfg.fedavg_every == 0:
            _fedavg_round(trainer, link, step // cfg.fedavg_every, fetch_poll_s, fetch_timeout_s)
        if trainer.state_dir is not None and step % cfg.checkpoint_every == 0:
            trainer.save()
        if on_step is not None:
            on_step(trainer, info)
    trainer.save()


def _fedavg_round(trainer: DeviceTrainer, link, round_: int, poll_s: float, timeout_s: float) -> None:
    """Wait for the round's average, sending this device's trainable weights when the
    server asks for them (every device, or the round's sample)."""
    weights = trainer.flat_weights()

    def ids():
        return dict(request_id=new_request_id(), fingerprint=trainer.fingerprint, step=round_,
                    device_id=trainer.device_id)

    deadline = time.monotonic() + timeout_s
    submit = False
    while True:
        if submit:
            _expect(link.request(tensors_frame(FrameKind.FEDAVG_SUBMIT, [array_part(weights)], **ids())),
                    FrameKind.ANSWER)
        res = link.request(json_frame(FrameKind.FEDAVG_FETCH, {}, **ids()))
        if res.kind == FrameKind.FEDAVG_RESULT:
            trainer.load_flat_weights(res.parts()[0].array())
            return
        code = res.json().get("code") if res.kind == FrameKind.ERROR else None
        if code not in ("not_ready", "resubmit") or time.monotonic() > deadline:
            _expect(res, FrameKind.FEDAVG_RESULT)
        submit = code == "resubmit"
        time.sleep(poll_s)


def _expect(frame: Frame, kind: FrameKind) -> None:
    raise_if_error(frame)
    if frame.kind != kind:
        raise CodedError("protocol", f"expected {kind.name}, got {frame.kind.name}")
