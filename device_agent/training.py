"""The device side of split training (`edgeqtl device train`): the device's images never
leave it; its client half sends codes up and applies the compressed gradient that comes
back. Needs torch (autograd), unlike device inference, which never imports this module.

    ShapesShard, RecordBatches   where its batches come from: a shard of the shapes
                                 world, or its own data file
    DeviceTrainer   the client half, its optimizer and checkpoints
    run_device      the loop: request -> link -> apply, fedavg rounds, checkpoints

The server side and the exactly-once rules are in server_agent/training.py.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from edgeqtl import shapes
from edgeqtl.errors import CodedError
from edgeqtl.wire import (Frame, FrameKind, array_part, codes_part, encode_frame, json_frame, new_request_id,
                          raise_if_error, tensors_frame, train_request_frame)
from edgeqtl.models.checkpoint import device_state_name, load_optimizer, load_state, optimizer_tensors, save_state
from edgeqtl.models.steps import SplitTrainConfig, adamw, client_backward, lr_at
from edgeqtl.models.training import ShapesCollator, image_spec_of, max_objects_at

TRAINABLE_CHOICES = ("projector", "encoder", "vision_tower", "layers", "embed_tokens")


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
        self.params = [params[n] for n in self.names]
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
        """The TRAIN_REQUEST of `step` (1-based), with what the update needs."""
        batch = self.batches(step - 1)
        out = self.client(batch.input_ids, batch.attention_mask, batch.pixel_values)
        if self.model.split.quantizer == "fsq":
            wire = codes_part(out.wire.numpy(), self.model.split.levels)
        else:
            wire = array_part(out.wire.detach().numpy().astype(np.float16))
        # the server keeps the replies after ckpt_step, for a restart from the checkpoint to replay;
        # a device without checkpoints cannot replay, and says so
        ckpt = self.ckpt_step if self.state_dir is not None else step - 1
        frame = train_request_frame(wire, batch.labels.numpy(), batch.attention_mask.numpy(), ckpt,
                                    request_id=new_request_id(), fingerprint=self.fingerprint, step=step,
                                    device_id=self.device_id)
        return frame, out, batch

    def apply(self, step: int, out, reply: Frame) -> dict:
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
        self.opt.zero_grad(set_to_none=True)
        client_backward(out, grad, self.model.split, self.cfg.commitment)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.step = step
        return info.json()

    def count_bytes(self, request: Frame, reply: Frame) -> None:
        """Wire bytes of a step both ways, frames whole, and the same frames carrying 16-bit
        hidden states up and a 16-bit gradient of them down (the unquantized split)."""
        wire = request.parts()[0]
        tokens = math.prod(wire.shape[:-1])
        up, down = len(encode_frame(request)), len(encode_frame(reply))
        self.bytes_up += up
        self.bytes_down += down
        self.fp16_up += up - len(wire.payload) + tokens * self.model.hidden_size * 2
        grad_payload = len(reply.parts()[0].payload) if reply.kind == FrameKind.GRADIENT else 0
        self.fp16_down += down - grad_payload + tokens * self.model.hidden_size * 2

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
        params = dict(self.client.named_parameters())
        tensors = {**{f"client.{n}": params[n] for n in self.names}, **opt_t}
        save_state(self.state_dir / device_state_name(self.device_id), tensors,
                   {"step": self.step, "optimizer": opt_meta, "names": self.names,
                    "bytes": [self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down]})
        self.ckpt_step = self.step

    def _restore(self) -> None:
        loaded = load_state(self.state_dir / device_state_name(self.device_id))
        if loaded is None:
            return
        tensors, meta = loaded
        if meta["names"] != self.names:
            raise CodedError("bad_checkpoint", "the checkpoint trained other parameters; use the same --trainable")
        params = dict(self.client.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(tensors[f"client.{n}"])
        load_optimizer(self.opt, tensors, meta["optimizer"])
        self.step = self.ckpt_step = meta["step"]
        self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down = meta["bytes"]


def run_device(trainer: DeviceTrainer, link, on_step=None, fetch_poll_s: float = 0.05,
               fetch_timeout_s: float = 600.0) -> None:
    """Train until cfg.steps; `link.request(frame) -> reply` (device_agent.links)."""
    cfg = trainer.cfg
    while trainer.step < cfg.steps:
        step = trainer.step + 1
        frame, out, _ = trainer.request(step)
        reply = link.request(frame)
        info = trainer.apply(step, out, reply)
        trainer.count_bytes(frame, reply)
        if cfg.fedavg_every and step % cfg.fedavg_every == 0:
            _fedavg_round(trainer, link, step // cfg.fedavg_every, fetch_poll_s, fetch_timeout_s)
        if trainer.state_dir is not None and step % cfg.checkpoint_every == 0:
            trainer.save()
        if on_step is not None:
            on_step(trainer, info)
    trainer.save()


def _fedavg_round(trainer: DeviceTrainer, link, round_: int, poll_s: float, timeout_s: float) -> None:
    """Send this device's trainable weights, then wait for the round's average."""
    weights = trainer.flat_weights()

    def ids():
        return dict(request_id=new_request_id(), fingerprint=trainer.fingerprint, step=round_,
                    device_id=trainer.device_id)

    deadline = time.monotonic() + timeout_s
    submit = True
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
