"""The server side of split training: devices keep their images and the client half,
this service trains the trunk (the server half) on their codes and sends the gradient
back compressed. It speaks frames, so it runs behind a Responder over MQTT
(`edgeqtl server train`) or in one process (device_agent.links.LocalLink).

One step of device d (step numbers start at 1 and are the device's own):
    device: TRAIN_REQUEST [codes, mask, answer positions, answer ids, {"ckpt_step"}], step s
    server: dequantise -> server half -> loss -> backward -> optimizer step (models.steps)
            GRADIENT [d loss / d dequantised codes (fp16 | int8 | int4), {"loss", ...}]

Exactly once, across restarts of either side:
  - the server applies step s of device d only if d's last applied step is s - 1; a
    repeat of an applied step is answered from the stored reply, a gap is an error;
  - it keeps every reply of d after d's last checkpoint (`ckpt_step`, sent in each
    request), so a device restarted from its checkpoint replays the steps it lost with
    the very gradients it had received, without the server applying them again;
  - it appends each request to a write-ahead log (fsynced) before it replies, and
    checkpoints every `checkpoint_every` steps; a restarted server loads the checkpoint
    and re-applies the logged requests, recomputing the same state and replies.
Each device's ledger counts the steps applied: `applied == step` for every device is
the proof that no step was applied twice or skipped.

Split-federated averaging (`fedavg_every`): at the end of each round every device sends
its trainable weights (FEDAVG_SUBMIT) and fetches the average (FEDAVG_FETCH) once all
`num_devices` have sent theirs. Rounds live in memory: after a restart the server asks
the devices to resubmit.

Nothing is pickled: weights, optimizer state and stored replies go to safetensors, the
rest to JSON, and the log holds edgeqtl frames read back with the strict frame decoder.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from edgeqtl.errors import CodedError
from edgeqtl.wire import (Frame, FrameKind, ProtocolError, array_part, decode_frame, encode_frame, error_frame,
                          gradient_part, json_frame, json_part, parse_train_request, tensors_frame)
from edgeqtl.models.checkpoint import SERVER_STATE, load_optimizer, load_state, optimizer_tensors, save_state
from edgeqtl.models.split import UnsupportedModelError
from edgeqtl.models.steps import SplitTrainConfig, adamw, lr_at, server_step

WAL_FILE = "server.wal"


@dataclasses.dataclass
class DeviceLedger:
    """What the server knows of one device's training."""

    step: int = 0  # the last step applied
    applied: int = 0  # how many steps were applied (== step when each was applied exactly once)
    replies: dict[int, bytes] = dataclasses.field(default_factory=dict)  # step -> encoded GRADIENT frame


class WriteAheadLog:
    """Length-prefixed frames, each fsynced before the reply it leads to is sent."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "ab")

    def append(self, data: bytes) -> None:
        self._file.write(struct.pack("<I", len(data)) + data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def clear(self) -> None:
        """Everything logged is in a checkpoint now."""
        self._file.close()
        self._file = open(self.path, "wb")

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def replay(path: Path) -> tuple[list[Frame], int]:
        """The logged frames, and the byte length of the whole records among them (a
        record cut short by a crash was never answered: it is dropped)."""
        data = path.read_bytes() if path.is_file() else b""
        frames, off = [], 0
        while off + 4 <= len(data):
            (n,) = struct.unpack_from("<I", data, off)
            if off + 4 + n > len(data):
                break
            frames.append(decode_frame(data[off + 4: off + 4 + n]))
            off += 4 + n
        return frames, off


class FedAvgRounds:
    """Weights submitted per round until every device has sent its own, then their mean."""

    def __init__(self, num_devices: int):
        self.num_devices = num_devices
        self.submitted: dict[int, dict[str, np.ndarray]] = {}  # round -> device -> weights
        self.averages: dict[int, np.ndarray] = {}

    def submit(self, round_: int, device_id: str, weights: np.ndarray) -> None:
        if round_ in self.averages:
            return  # a retry after the round closed
        self.submitted.setdefault(round_, {})[device_id] = weights.copy()
        if len(self.submitted[round_]) == self.num_devices:
            self.averages[round_] = np.mean(np.stack(list(self.submitted.pop(round_).values())), axis=0)
            for old in [k for k in self.averages if k < round_ - 1]:
                del self.averages[old]

    def average(self, round_: int, device_id: str) -> np.ndarray:
        if round_ not in self.averages and device_id not in self.submitted.get(round_, {}):
            raise CodedError("resubmit", f"round {round_}: no weights from {device_id}; send them again")
        if round_ not in self.averages:
            waiting = len(self.submitted.get(round_, {}))
            raise CodedError("not_ready", f"round {round_}: {waiting} of {self.num_devices} devices have sent weights")
        return self.averages[round_]


class TrainingService:
    """Trains the server half on TRAIN_REQUEST frames from any number of devices."""

    def __init__(self, model, cfg: SplitTrainConfig, state_dir: str | Path | None = None, num_devices: int = 1,
                 fingerprint: bytes = bytes(16)):
        if model.split.exact_text:
            # Split training sends every position as codes; an exact-text split's trunk expects the text's
            # own embeddings there, so training on it would teach the trunk the wrong input.
            raise UnsupportedModelError("this model keeps the prompt's text exact at cut 0 (an adapted model); "
                                        "split training sends every position as codes: start it from a --preset "
                                        "model or a checkpoint without an adapted quantizer")
        self.model = model
        self.server = model.server.train()
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.params = list(self.server.parameters())
        self.opt = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.server_steps = 0
        self.ledgers: dict[str, DeviceLedger] = {}
        self.rounds = FedAvgRounds(num_devices)
        self.rng = np.random.default_rng(cfg.seed)  # int4's stochastic rounding
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock = threading.RLock()  # save() runs both inside a step and from the agent's shutdown
        self._wal: WriteAheadLog | None = None
        if self.state_dir is not None:
            self._restore()
            self._wal = WriteAheadLog(self.state_dir / WAL_FILE)

    # ---------------------------------------------------------------- frames in, frames out
    def handle_batch(self, frames: list[Frame]) -> list[Frame]:
        return [self.handle(f) for f in frames]  # steps of one trunk are sequential by nature

    def handle(self, frame: Frame) -> Frame:
        with self._lock:
            try:
                if frame.fingerprint != self.fingerprint:
                    raise CodedError("fingerprint_mismatch", "the device trains another model: start both sides "
                                                             "from the same model directory")
                if frame.kind == FrameKind.TRAIN_REQUEST:
                    return self._train(frame, log=True)
                if frame.kind == FrameKind.FEDAVG_SUBMIT:
                    self.rounds.submit(frame.step, frame.device_id, frame.parts()[0].array().astype(np.float32))
                    return json_frame(FrameKind.ANSWER, {"round": frame.step, "received": True},
                                      request_id=frame.request_id, fingerprint=frame.fingerprint, step=frame.step)
                if frame.kind == FrameKind.FEDAVG_FETCH:
                    average = self.rounds.average(frame.step, frame.device_id)
                    return tensors_frame(FrameKind.FEDAVG_RESULT, [array_part(average)], request_id=frame.request_id,
                                         fingerprint=frame.fingerprint, step=frame.step)
                raise CodedError("bad_kind", f"a training server takes TRAIN_REQUEST and FEDAVG frames, not "
                                             f"{frame.kind.name}")
            except ProtocolError as e:
                return error_frame(CodedError("bad_request", str(e)), **frame.reply_fields())
            except CodedError as e:
                return error_frame(e, **frame.reply_fields())

    def _train(self, frame: Frame, log: bool) -> Frame:
        ledger = self.ledgers.setdefault(frame.device_id, DeviceLedger())
        s = frame.step
        if s <= ledger.step:
            if s in ledger.replies:  # a retry or a replay: the same gradient, addressed to this request
                return dataclasses.replace(decode_frame(ledger.replies[s]), request_id=frame.request_id)
            raise CodedError("stale_step", f"step {s} of {frame.device_id} was applied and its reply dropped "
                                           f"(the device checkpointed after it); the server is at {ledger.step}")
        if s != ledger.step + 1:
            raise CodedError("step_gap", f"device {frame.device_id} sent step {s}, the server expects "
                                         f"{ledger.step + 1}")
        req = parse_train_request(frame)
        split = self.model.split
        codes = torch.from_numpy(np.array(req.codes.array()))  # a writable copy
        if split.quantizer == "fsq" and (req.codes.levels != split.levels or codes.shape[-1] != split.code_dim):
            raise CodedError("bad_codec", f"expected {split.levels}-level codes of width {split.code_dim}")
        vocab = self.server.lm_head.out_features
        if int(req.labels.max(initial=0)) >= vocab:
            raise CodedError("bad_request", f"an answer id is outside the vocabulary of {vocab}")
        if log and self._wal is not None:  # before the reply: a crash after this replays the step
            self._wal.append(encode_frame(frame))
        reply = self._apply(frame, codes, torch.from_numpy(req.labels), torch.from_numpy(req.attention_mask))
        ledger.step = s
        ledger.applied += 1
        ledger.replies[s] = encode_frame(reply)
        for k in [k for k in ledger.replies if k <= req.ckpt_step and k != s]:
            del ledger.replies[k]  # the device can no longer need these
        self.server_steps += 1
        if log and self.state_dir is not None and self.server_steps % self.cfg.checkpoint_every == 0:
            self.save()
        return reply

    def _apply(self, frame: Frame, codes, labels, mask) -> Frame:
        for g in self.opt.param_groups:  # the schedule runs over the devices' steps, not the sum of them
            g["lr"] = lr_at(self.server_steps // max(1, self.rounds.num_devices), self.cfg)
        self.opt.zero_grad(set_to_none=True)
        step = server_step(self.server, self.server.receive(codes), labels, mask)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        grad = step.grad.numpy()
        body = {"loss": step.loss, "server_step": self.server_steps + 1, "token_accuracy": step.token_accuracy}
        g_part = array_part(grad.astype(np.float32)) if self.cfg.grad_codec == "fp32" else \
            gradient_part(grad, self.cfg.grad_codec, self.rng)
        return tensors_frame(FrameKind.GRADIENT, [g_part, json_part(body)], request_id=frame.request_id,
                             fingerprint=frame.fingerprint, step=frame.step)

    # ---------------------------------------------------------------- checkpoint, log, restore
    def save(self) -> None:
        with self._lock:
            opt_t, opt_meta = optimizer_tensors(self.opt)
            tensors = {**{f"server.{k}": v for k, v in self.server.state_dict().items()}, **opt_t}
            replies = []
            for device_id, ledger in self.ledgers.items():
                for s, data in ledger.replies.items():
                    tensors[f"reply.{len(replies)}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    replies.append([device_id, s])
            meta = {"server_steps": self.server_steps, "optimizer": opt_meta, "rng": self.rng.bit_generator.state,
                    "devices": {d: {"step": led.step, "applied": led.applied} for d, led in self.ledgers.items()},
                    "replies": replies}
            save_state(self.state_dir / SERVER_STATE, tensors, meta)
            if self._wal is not None:
                self._wal.clear()

    def _restore(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        loaded = load_state(self.state_dir / SERVER_STATE)
        if loaded is not None:
            tensors, meta = loaded
            self.server.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("server.")})
            load_optimizer(self.opt, tensors, meta["optimizer"])
            self.server_steps = meta["server_steps"]
            self.rng.bit_generator.state = meta["rng"]
            self.ledgers = {d: DeviceLedger(v["step"], v["applied"]) for d, v in meta["devices"].items()}
            for i, (device_id, s) in enumerate(meta["replies"]):
                self.ledgers[device_id].replies[s] = tensors[f"reply.{i}"].numpy().tobytes()
        wal = self.state_dir / WAL_FILE
        frames, whole = WriteAheadLog.replay(wal)
        for frame in frames:
            if frame.step == self.ledgers.get(frame.device_id, DeviceLedger()).step + 1:
                self._train(frame, log=False)
        if wal.is_file():  # keep the log to what was replayed
            with open(wal, "r+b") as f:
                f.truncate(whole)

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
