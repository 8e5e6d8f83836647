"""Split training: devices keep their images and the client half, the server trains the
trunk, gradients come back compressed. Both sides are plain objects that speak frames,
so the same code runs over MQTT (`edgeqtl device train`, `edgeqtl server --train`) or in
one process (`LocalLink`, the reference the benchmark compares against).

One step of device d (step numbers start at 1 and are the device's own):
    device: batch from its shard -> client half -> codes
            TRAIN_REQUEST [codes, mask, answer positions, answer ids, {"ckpt_step"}], step = s
    server: dequantise -> server half -> cross-entropy -> backward -> optimizer step
            GRADIENT [d loss / d dequantised codes (fp16 | int8 | int4), {"loss", ...}]
    device: the gradient through the straight-through estimator, plus the commitment
            loss -> optimizer step on its trainable parameters

Exactly once, across restarts of either side:
  - the server applies step s of device d only if its last applied step for d is s - 1;
    a repeat of the last step is answered from the stored reply, a gap is an error;
  - the server keeps every reply of d after d's last checkpoint (`ckpt_step`, sent in
    each request), so a device restarted from its checkpoint replays the steps it lost
    with the very gradients it had received, without the server applying them again;
  - the server writes each applied request to a write-ahead log before it replies and
    checkpoints every `checkpoint_every` steps; a restarted server loads the checkpoint
    and re-applies the logged requests, recomputing the same state and replies.
Nothing is pickled: weights and optimizer state go to safetensors, the rest to JSON,
and the log holds edgeqtl frames, read back with the strict frame decoder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeqtl import shapes
from edgeqtl.wire import (IGNORE_LABEL, Frame, FrameKind, ProtocolError, array_part, codes_part, decode_frame,
                          encode_frame, gradient_part, json_frame, json_part, new_request_id, parse_train_request,
                          tensors_frame, train_request_frame)

from .quantizer import commitment_loss
from .split import SplitModel
from .training import ShapesCollator, _adamw, image_spec_of, lr_at, max_objects_at

TRAINABLE_CHOICES = ("projector", "encoder", "vision_tower", "layers", "embed_tokens")


@dataclasses.dataclass
class SplitTrainConfig:
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
    seed: int = 0


class TrainingError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- data shards


def family_mix(device_index: int, num_devices: int, alpha: float | None, seed: int) -> np.ndarray:
    """The device's family proportions: uniform (IID, alpha None) or Dirichlet(alpha)."""
    if alpha is None:
        return np.full(len(shapes.FAMILIES), 1 / len(shapes.FAMILIES))
    rng = np.random.default_rng([seed, 7919, num_devices])
    return rng.dirichlet(np.full(len(shapes.FAMILIES), alpha), size=num_devices)[device_index]


def shard_batch(seed: int, device_index: int, step: int, batch_size: int, mix: np.ndarray,
                max_objects: int) -> list:
    """Batch `step` of this device's shard: its own stream (no other device or the
    server ever sees these images), families by largest remainder of `mix`."""
    w = mix * batch_size
    counts = np.floor(w).astype(int)
    for i in np.argsort(-(w - counts))[: batch_size - counts.sum()]:
        counts[i] += 1
    fams = tuple(f for f, c in zip(shapes.FAMILIES, counts) for _ in range(c))
    return shapes.train_batch(seed, step, batch_size, families=fams, stream=100 + device_index,
                              max_objects=max_objects)


# --------------------------------------------------------------------------- state on disk


def _save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors to a fresh <name>-<n>.safetensors, then <name>.json (naming that file)
    replaced atomically: a crash at any point leaves the previous state whole."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.with_suffix(".json").read_text()).get("tensors_file") \
        if path.with_suffix(".json").is_file() else None
    n = 1 + max([int(p.stem.rsplit("-", 1)[1]) for p in path.parent.glob(f"{path.name}-*.safetensors")] or [0])
    tensors_file = f"{path.name}-{n}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path.parent / tensors_file))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, "tensors_file": tensors_file}))
    os.replace(tmp, path.with_suffix(".json"))
    if old and old != tensors_file:
        (path.parent / old).unlink(missing_ok=True)


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    if not path.with_suffix(".json").is_file():
        return None
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_file(str(path.parent / meta["tensors_file"])), meta


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict, dict]:
    """AdamW state as named tensors plus JSON (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "opt") -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- server


class ServerTrainer:
    """Trains the server half on TRAIN_REQUEST frames from any number of devices."""

    def __init__(self, model: SplitModel, cfg: SplitTrainConfig, state_dir: str | Path | None = None,
                 num_devices: int = 1, fingerprint: bytes = bytes(16)):
        self.model = model
        self.server = model.server.train()
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.num_devices = num_devices
        self.params = list(self.server.parameters())
        self.opt = _adamw(self.params, cfg.lr, cfg.weight_decay)
        self.server_steps = 0
        self.devices: dict[str, dict] = {}  # id -> {"step": last applied, "replies": {step: frame hex}}
        self.applied: dict[str, list[int]] = {}  # every step applied, in order (what the tests check)
        self.rounds: dict[int, dict[str, np.ndarray]] = {}  # fedavg round -> device -> weights
        self.averages: dict[int, np.ndarray] = {}
        self.rng = np.random.default_rng(cfg.seed)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock = threading.RLock()  # save() runs both inside a step and from the agent's shutdown
        self._wal = None
        if self.state_dir is not None:
            self._restore()
            self._wal = open(self.state_dir / "server.wal", "ab")

    # ---------------------------------------------------------------- frames in, frames out
    def handle_batch(self, frames: list[Frame]) -> list[Frame]:
        return [self.handle(f) for f in frames]  # steps of one trunk are sequential by nature

    def handle(self, frame: Frame) -> Frame:
        with self._lock:
            try:
                if frame.fingerprint != self.fingerprint:
                    raise TrainingError("fingerprint_mismatch", "the device trains another model: start both sides "
                                                                "from the same model directory")
                if frame.kind == FrameKind.TRAIN_REQUEST:
                    return self._train(frame, log=True)
                if frame.kind == FrameKind.FEDAVG_SUBMIT:
                    return self._fedavg_submit(frame)
                if frame.kind == FrameKind.FEDAVG_FETCH:
                    return self._fedavg_fetch(frame)
                raise TrainingError("bad_kind", f"a training server takes TRAIN_REQUEST and FEDAVG frames, not "
                                                f"{frame.kind.name}")
            except (TrainingError, ProtocolError, ValueError) as e:
                code = getattr(e, "code", "bad_request")
                return json_frame(FrameKind.ERROR, {"code": code, "message": str(e)}, request_id=frame.request_id,
                                  fingerprint=frame.fingerprint, step=frame.step)

    def _train(self, frame: Frame, log: bool) -> Frame:
        dev = self.devices.setdefault(frame.device_id, {"step": 0, "replies": {}})
        s = frame.step
        if s <= dev["step"]:
            if str(s) in dev["replies"]:  # a retry or a replay: the same gradient, addressed to this request
                stored = decode_frame(bytes.fromhex(dev["replies"][str(s)]))
                return dataclasses.replace(stored, request_id=frame.request_id)
            raise TrainingError("stale_step", f"step {s} of {frame.device_id} was applied and its reply dropped "
                                              f"(the device checkpointed after it); the server is at {dev['step']}")
        if s != dev["step"] + 1:
            raise TrainingError("step_gap", f"device {frame.device_id} sent step {s}, the server expects "
                                            f"{dev['step'] + 1}")
        try:
            req = parse_train_request(frame)
        except ProtocolError as e:
            raise TrainingError("bad_request", str(e)) from None
        split = self.model.split
        codes = torch.from_numpy(np.array(req.codes.array()))  # a writable copy
        if split.quantizer == "fsq" and (req.codes.levels != split.levels or codes.shape[-1] != split.code_dim):
            raise TrainingError("bad_codec", f"expected {split.levels}-level codes of width {split.code_dim}")
        vocab = self.server.lm_head.out_features
        if int(req.labels.max(initial=0)) >= vocab:
            raise TrainingError("bad_request", f"an answer id is outside the vocabulary of {vocab}")
        if log and self._wal is not None:  # before the reply: a crash after this replays the step
            data = encode_frame(frame)
            self._wal.write(struct.pack("<I", len(data)) + data)
            self._wal.flush()
            os.fsync(self._wal.fileno())
        reply = self._apply(frame, codes, torch.from_numpy(req.labels), torch.from_numpy(req.attention_mask))
        dev["step"] = s
        dev["replies"][str(s)] = encode_frame(reply).hex()
        for k in [k for k in dev["replies"] if int(k) <= req.ckpt_step and int(k) != s]:
            del dev["replies"][k]  # the device can no longer need these
        self.applied.setdefault(frame.device_id, []).append(s)
        self.server_steps += 1
        if log and self.state_dir is not None and self.server_steps % self.cfg.checkpoint_every == 0:
            self.save()
        return reply

    def _apply(self, frame: Frame, codes, labels, mask) -> Frame:
        for g in self.opt.param_groups:  # the schedule runs over the devices' steps, not the sum of them
            g["lr"] = lr_at(self.server_steps // max(1, self.num_devices), self.cfg)
        values = self.server.receive(codes).detach().requires_grad_(True)
        logits = self.server.forward_values(values, mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_LABEL)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        grad = values.grad.numpy()
        answer_pos = (labels[:, 1:] != IGNORE_LABEL)
        correct = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & answer_pos).sum().item()
        body = {"loss": loss.item(), "server_step": self.server_steps + 1,
                "token_accuracy": correct / max(1, int(answer_pos.sum()))}
        g_part = array_part(grad.astype(np.float32)) if self.cfg.grad_codec == "fp32" else \
            gradient_part(grad, self.cfg.grad_codec, self.rng)
        return tensors_frame(FrameKind.GRADIENT, [g_part, json_part(body)], request_id=frame.request_id,
                             fingerprint=frame.fingerprint, step=frame.step)

    # ---------------------------------------------------------------- split-federated averaging
    def _fedavg_submit(self, frame: Frame) -> Frame:
        r = frame.step
        weights = frame.parts()[0].array().astype(np.float32)
        if r in self.averages:
            pass  # a retry after the round closed
        else:
            self.rounds.setdefault(r, {})[frame.device_id] = weights.copy()
            if len(self.rounds[r]) == self.num_devices:
                self.averages[r] = np.mean(np.stack(list(self.rounds.pop(r).values())), axis=0)
                for old in [k for k in self.averages if k < r - 1]:
                    del self.averages[old]
        return json_frame(FrameKind.ANSWER, {"round": r, "received": True}, request_id=frame.request_id,
                          fingerprint=frame.fingerprint, step=r)

    def _fedavg_fetch(self, frame: Frame) -> Frame:
        r = frame.step
        if r not in self.averages and frame.device_id not in self.rounds.get(r, {}):
            # e.g. the server restarted after the device sent its weights: rounds live in memory
            raise TrainingError("resubmit", f"round {r}: no weights from {frame.device_id}; send them again")
        if r not in self.averages:
            waiting = len(self.rounds.get(r, {}))
            raise TrainingError("not_ready", f"round {r}: {waiting} of {self.num_devices} devices have sent weights")
        return tensors_frame(FrameKind.FEDAVG_RESULT, [array_part(self.averages[r])], request_id=frame.request_id,
                             fingerprint=frame.fingerprint, step=r)

    # ---------------------------------------------------------------- checkpoint, log, restore
    def close(self) -> None:
        """Close the write-ahead log (what it holds is on disk already)."""
        with self._lock:
            if self._wal is not None:
                self._wal.close()
                self._wal = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def save(self) -> None:
        with self._lock:
            opt_t, opt_meta = _optimizer_tensors(self.opt)
            tensors = {**{f"server.{k}": v for k, v in self.server.state_dict().items()}, **opt_t}
            meta = {"server_steps": self.server_steps, "devices": self.devices, "applied": self.applied,
                    "optimizer": opt_meta, "rng": self.rng.bit_generator.state}
            _save_state(self.state_dir / "server", tensors, meta)
            if self._wal is not None:  # everything logged is now in the checkpoint
                self._wal.close()
                self._wal = open(self.state_dir / "server.wal", "wb")

    def _restore(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        loaded = _load_state(self.state_dir / "server")
        if loaded is not None:
            tensors, meta = loaded
            self.server.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("server.")})
            _load_optimizer(self.opt, tensors, meta["optimizer"])
            self.server_steps = meta["server_steps"]
            self.devices = meta["devices"]
            self.applied = {k: list(v) for k, v in meta["applied"].items()}
            self.rng.bit_generator.state = meta["rng"]
        wal = self.state_dir / "server.wal"
        if wal.is_file():
            data = wal.read_bytes()
            off = 0
            while off + 4 <= len(data):
                (n,) = struct.unpack_from("<I", data, off)
                if off + 4 + n > len(data):
                    break  # a record cut short by the crash: its reply was never sent
                frame = decode_frame(data[off + 4: off + 4 + n])
                off += 4 + n
                if frame.step == self.devices.get(frame.device_id, {}).get("step", 0) + 1:
                    self._train(frame, log=False)
            # keep the log consistent with what was replayed: rewrite it from scratch
            wal.write_bytes(data[:off])


# --------------------------------------------------------------------------- device


class DeviceTrainer:
    """The device side: its shard, the client half, its optimizer and checkpoints."""

    def __init__(self, model: SplitModel, tokenizer, cfg: SplitTrainConfig, device_id: str, device_index: int = 0,
                 num_devices: int = 1, alpha: float | None = None, state_dir: str | Path | None = None,
                 fingerprint: bytes = bytes(16)):
        unknown = set(cfg.trainable) - set(TRAINABLE_CHOICES)
        if unknown:
            raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {TRAINABLE_CHOICES}")
        self.model = model
        self.client = model.client.train()
        self.cfg = cfg
        self.device_id = device_id
        self.index = device_index
        self.mix = family_mix(device_index, num_devices, alpha, cfg.seed)
        self.collate = ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model))
        for p in self.client.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in self.client.named_parameters() if n.split(".")[0] in cfg.trainable]
        params = dict(self.client.named_parameters())
        self.params = [params[n] for n in self.names]
        for p in self.params:
            p.requires_grad_(True)
        if not self.params:
            raise ValueError(f"nothing to train on the device: {cfg.trainable} match no parameters")
        self.opt = _adamw(self.params, cfg.lr, cfg.weight_decay)
        self.fingerprint = fingerprint
        self.step = 0  # steps applied
        self.ckpt_step = 0
        self.bytes_up = self.bytes_down = 0
        self.fp16_up = self.fp16_down = 0
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self._restore()

    def _batch(self, step: int):
        cfg = self.cfg
        max_obj = max_objects_at(step, cfg)
        return self.collate(shard_batch(cfg.seed, self.index, step, cfg.batch_size, self.mix, max_obj))

    def request(self, step: int) -> tuple[Frame, object, object]:
        """The TRAIN_REQUEST of `step` (1-based), with what the update needs."""
        batch = self._batch(step - 1)
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
        if reply.kind == FrameKind.ERROR:
            err = reply.json()
            raise TrainingError(err.get("code", "error"), f"server refused step {step}: {err.get('message')}")
        if reply.kind != FrameKind.GRADIENT or reply.step != step:
            raise TrainingError("protocol", f"expected the GRADIENT of step {step}, got {reply.kind.name} "
                                            f"of step {reply.step}")
        g_part, info = reply.parts()
        grad = torch.from_numpy(np.array(g_part.array(), dtype=np.float32))  # a writable copy
        if grad.shape != out.values.shape:
            raise TrainingError("bad_shape", f"gradient {list(grad.shape)} for values {list(out.values.shape)}")
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step - 1, self.cfg)
        obj = (out.values * grad).sum()
        if self.model.split.quantizer == "fsq" and self.cfg.commitment > 0:
            obj = obj + self.cfg.commitment * commitment_loss(out.values, self.model.split.levels)
        self.opt.zero_grad(set_to_none=True)
        obj.backward()
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
            raise TrainingError("bad_shape", "averaged weights do not fit this device's trainable parameters")
        off = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(torch.from_numpy(flat[off: off + p.numel()].copy()).view_as(p))
                off += p.numel()

    # ---------------------------------------------------------------- checkpoint
    def save(self) -> None:
        if self.state_dir is None:
            return
        opt_t, opt_meta = _optimizer_tensors(self.opt)
        params = dict(self.client.named_parameters())
        tensors = {**{f"client.{n}": params[n] for n in self.names}, **opt_t}
        _save_state(self.state_dir / f"device-{self.device_id}", tensors,
                    {"step": self.step, "optimizer": opt_meta, "names": self.names,
                     "bytes": [self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down]})
        self.ckpt_step = self.step

    def _restore(self) -> None:
        loaded = _load_state(self.state_dir / f"device-{self.device_id}")
        if loaded is None:
            return
        tensors, meta = loaded
        if meta["names"] != self.names:
            raise TrainingError("bad_checkpoint", "the checkpoint trained other parameters; use the same --trainable")
        params = dict(self.client.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(tensors[f"client.{n}"])
        _load_optimizer(self.opt, tensors, meta["optimizer"])
        self.step = self.ckpt_step = meta["step"]
        self.bytes_up, self.bytes_down, self.fp16_up, self.fp16_down = meta["bytes"]


# --------------------------------------------------------------------------- the loop


class LocalLink:
    """Frames straight to a ServerTrainer, in process: the reference for the benchmark."""

    def __init__(self, server: ServerTrainer):
        self.server = server

    def request(self, frame: Frame, timeout: float = 0, retries: int = 0) -> Frame:
        return self.server.handle(decode_frame(encode_frame(frame)))


def run_device(trainer: DeviceTrainer, link, on_step=None, fetch_poll_s: float = 0.05,
               fetch_timeout_s: float = 600.0) -> None:
    """Train until cfg.steps; `link.request(frame) -> reply` (a RequestClient or a LocalLink)."""
    import time

    cfg = trainer.cfg
    while trainer.step < cfg.steps:
        step = trainer.step + 1
        frame, out, _ = trainer.request(step)
        reply = link.request(frame)
        info = trainer.apply(step, out, reply)
        trainer.count_bytes(frame, reply)
        if cfg.fedavg_every and step % cfg.fedavg_every == 0:
            r = step // cfg.fedavg_every
            weights = trainer.flat_weights()

            def ids():
                return dict(request_id=new_request_id(), fingerprint=trainer.fingerprint, step=r,
                            device_id=trainer.device_id)

            deadline = time.monotonic() + fetch_timeout_s
            submit = True
            while True:
                if submit:
                    _expect(link.request(tensors_frame(FrameKind.FEDAVG_SUBMIT, [array_part(weights)], **ids())),
                            FrameKind.ANSWER)
                res = link.request(json_frame(FrameKind.FEDAVG_FETCH, {}, **ids()))
                if res.kind == FrameKind.FEDAVG_RESULT:
                    trainer.load_flat_weights(res.parts()[0].array())
                    break
                code = res.json().get("code") if res.kind == FrameKind.ERROR else None
                if code not in ("not_ready", "resubmit") or time.monotonic() > deadline:
                    _expect(res, FrameKind.FEDAVG_RESULT)
                submit = code == "resubmit"
                time.sleep(fetch_poll_s)
        if trainer.state_dir is not None and step % cfg.checkpoint_every == 0:
            trainer.save()
        if on_step is not None:
            on_step(trainer, info)
    trainer.save()


def _expect(frame: Frame, kind: FrameKind) -> None:
    if frame.kind == FrameKind.ERROR:
        err = frame.json()
        raise TrainingError(err.get("code", "error"), err.get("message", ""))
    if frame.kind != kind:
        raise TrainingError("protocol", f"expected {kind.name}, got {frame.kind.name}")


__all__ = ["SplitTrainConfig", "ServerTrainer", "DeviceTrainer", "LocalLink", "run_device", "family_mix",
           "shard_batch", "TrainingError"]


def merge_trained(base_dir: str | Path, server_state: str | Path, device_state: str | Path, device_id: str,
                  out_dir: str | Path) -> Path:
    """One split model directory from a split-training run: the starting model, the
    server's trained trunk and one device's trained client parts (with --fedavg-every,
    the devices' parts agree after the last round). `edgeqtl export` takes the result."""
    from .load import load_split_model
    from .training import save_checkpoint, TrainConfig

    model = load_split_model(base_dir)
    server = _load_state(Path(server_state) / "server")
    device = _load_state(Path(device_state) / f"device-{device_id}")
    if server is None:
        raise FileNotFoundError(f"no server checkpoint in {server_state} (server.json); give the server's --state-dir")
    if device is None:
        raise FileNotFoundError(f"no checkpoint of device {device_id!r} in {device_state}; give that device's "
                                "--state-dir and --device-id")
    model.server.load_state_dict({k[7:]: v for k, v in server[0].items() if k.startswith("server.")})
    params = dict(model.client.named_parameters())
    with torch.no_grad():
        for name in device[1]["names"]:
            params[name].copy_(device[0][f"client.{name}"])
    return save_checkpoint(model, out_dir, TrainConfig(), device[1]["step"])
