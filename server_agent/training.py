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

Label-private steps (`private_labels`, a U-shaped split): the device keeps norm, lm_head,
the labels and the loss. Step s is two exchanges:
    device: TRUNK_REQUEST [codes, mask, output positions, {"ckpt_step"}]   (no answer ids)
    server: trunk forward -> TRUNK_HIDDEN [hidden states at the output positions]
    device: its head -> loss -> HEAD_GRADIENT [d loss / d those hidden states]
    server: trunk backward -> optimizer step -> GRADIENT [d loss / d dequantised codes]
Only the HEAD_GRADIENT applies the step, under the same rules as a TRAIN_REQUEST; both
replies are kept, so a device that replays a step gets the hidden states it had.

Split-federated averaging (`fedavg_every`): at the end of each round each device asks for
the average (FEDAVG_FETCH); the server asks the round's participants for their trainable
weights (ERROR resubmit: send them, FEDAVG_SUBMIT) and answers everyone with the mean
once they have all sent theirs. The participants are every device, or K of the N
(`devices_per_round`: a seeded random choice per round, or the first K to send); after
`round_deadline_s` a round closes with the weights it has, and stragglers are left out.
Rounds live in memory: after a restart the server asks the devices to resubmit.

Nothing is pickled: weights, optimizer state and stored replies go to safetensors, the
rest to JSON, and the log holds edgeqtl frames read back with the strict frame decoder.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edgeqtl.errors import CodedError
from edgeqtl.wire import (Frame, FrameKind, ProtocolError, array_part, decode_frame, encode_frame, error_frame,
                          gradient_part, hidden_part_of, json_frame, json_part, parse_train_request,
                          parse_trunk_request, tensors_frame)
from edgeqtl.models.checkpoint import SERVER_STATE, load_optimizer, load_state, optimizer_tensors, save_state
from edgeqtl.models.split import UnsupportedModelError
from edgeqtl.models.steps import SplitTrainConfig, adamw, lr_at, server_step, trunk_forward

WAL_FILE = "server.wal"


@dataclasses.dataclass
class TrunkPass:
    """A label-private step between its two exchanges: the trunk's forward, kept for the
    backward while no other step changed the trunk (`version`), else computed again."""

    step: int
    request: Frame
    reply: bytes  # the encoded TRUNK_HIDDEN the device got
    version: int  # server steps applied when the forward ran
    values: torch.Tensor
    hidden: torch.Tensor


@dataclasses.dataclass
class DeviceLedger:
    """What the server knows of one device's training."""

    step: int = 0  # the last step applied
    applied: int = 0  # how many steps were applied (== step when each was applied exactly once)
    replies: dict[int, bytes] = dataclasses.field(default_factory=dict)  # step -> encoded GRADIENT frame
    hidden_replies: dict[int, bytes] = dataclasses.field(default_factory=dict)  # label-private: TRUNK_HIDDEN
    pending: TrunkPass | None = None


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
    """Weights submitted per round by its participants, then their mean. Participants:
    every device, or `per_round` of the `num_devices` (`sampling` "random": a seeded
    choice among the devices seen so far, "first": the first to send). A round opens at
    its first request and, with a `deadline_s`, closes that long after with the weights it
    has (at least one)."""

    def __init__(self, num_devices: int, per_round: int = 0, sampling: str = "random", deadline_s: float = 0.0,
                 seed: int = 0, clock=time.monotonic):
        if not 0 <= per_round <= num_devices:
            raise CodedError("bad_config", f"devices per round must be within 0..{num_devices}, got {per_round}")
        if sampling not in ("random", "first"):
            raise CodedError("bad_config", f"sampling is random or first, got {sampling!r}")
        self.num_devices = num_devices
        self.per_round = per_round or num_devices
        self.sampling, self.deadline_s, self.seed, self.clock = sampling, deadline_s, seed, clock
        self.devices: set[str] = set()  # every device seen: random sampling draws from them
        self.submitted: dict[int, dict[str, np.ndarray]] = {}  # round -> device -> weights
        self.samples: dict[int, list[str]] = {}  # round -> its random participants
        self.opened: dict[int, float] = {}
        self.averages: dict[int, np.ndarray] = {}
        self.members: dict[int, list[str]] = {}  # round -> whose weights its average holds

    def see(self, device_id: str) -> None:
        self.devices.add(device_id)

    def participants(self, round_: int) -> list[str] | None:
        """The devices whose weights round `round_` waits for; None: any (all, or the first
        K to send). A random sample is drawn once all `num_devices` have been seen, or at
        the deadline from those seen; until then, CodedError not_ready."""
        if self.per_round == self.num_devices or self.sampling == "first":
            return None
        if round_ not in self.samples:
            if len(self.devices) < self.num_devices and not self._late(round_):
                raise CodedError("not_ready", f"round {round_}: {len(self.devices)} of {self.num_devices} devices "
                                              "have been seen; the sample is drawn from all of them")
            pool = sorted(self.devices)
            rng = np.random.default_rng([self.seed, round_])
            self.samples[round_] = sorted(str(d) for d in rng.choice(pool, size=min(self.per_round, len(pool)),
                                                                     replace=False))
        return self.samples[round_]

    def _late(self, round_: int) -> bool:
        return bool(self.deadline_s) and self.clock() - self.opened[round_] >= self.deadline_s

    def submit(self, round_: int, device_id: str, weights: np.ndarray) -> bool:
        """Whether the weights count in the round (not: closed, or not a participant)."""
        self.see(device_id)
        self.opened.setdefault(round_, self.clock())
        try:
            sample = self.participants(round_)
        except CodedError:
            return False  # no sample yet: the device is asked again once there is one
        if round_ in self.averages or (sample is not None and device_id not in sample):
            return False
        self.submitted.setdefault(round_, {})[device_id] = weights.copy()
        self._close_if_done(round_)
        return True

    def _close_if_done(self, round_: int) -> None:
        got = self.submitted.get(round_, {})
        sample = self.participants(round_)
        full = set(sample) <= set(got) if sample is not None else len(got) >= self.per_round
        if not (full or (got and self._late(round_))):
            return
        self.members[round_] = sorted(got)
        self.averages[round_] = np.mean(np.stack([got[d] for d in self.members[round_]]), axis=0)
        del self.submitted[round_]
        for old in [k for k in self.averages if k < round_ - 1]:
            del self.averages[old], self.members[old]

    def average(self, round_: int, device_id: str) -> np.ndarray:
        self.see(device_id)
        self.opened.setdefault(round_, self.clock())
        if round_ not in self.averages:
            self._close_if_done(round_)  # not_ready while no sample can be drawn
        if round_ in self.averages:
            return self.averages[round_]
        got = self.submitted.get(round_, {})
        sample = self.participants(round_)
        wanted = device_id in sample if sample is not None else len(got) < self.per_round
        if wanted and device_id not in got:
            raise CodedError("resubmit", f"round {round_}: send the weights of {device_id}")
        need = len(sample) if sample is not None else self.per_round
        raise CodedError("not_ready", f"round {round_}: {len(got)} of {need} devices have sent weights")


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
        # label-private: norm and lm_head are the device's; the server trains the trunk only
        head = {id(p) for p in (*self.server.norm.parameters(), *self.server.lm_head.parameters())}
        self.params = [p for p in self.server.parameters() if not (cfg.private_labels and id(p) in head)]
        self.opt = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.server_steps = 0
        self.ledgers: dict[str, DeviceLedger] = {}
        self.rounds = FedAvgRounds(num_devices, cfg.devices_per_round, cfg.sampling, cfg.round_deadline_s, cfg.seed)
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
                if frame.kind in (FrameKind.TRAIN_REQUEST, FrameKind.TRUNK_REQUEST, FrameKind.HEAD_GRADIENT):
                    self._check_protocol(frame.kind)
                    if frame.kind == FrameKind.TRAIN_REQUEST:
                        return self._train(frame, log=True)
                    if frame.kind == FrameKind.TRUNK_REQUEST:
                        return self._trunk(frame, log=True)
                    return self._head(frame, log=True)
                if frame.kind == FrameKind.FEDAVG_SUBMIT:
                    used = self.rounds.submit(frame.step, frame.device_id,
                                              frame.parts()[0].array().astype(np.float32))
                    return json_frame(FrameKind.ANSWER, {"round": frame.step, "received": used},
                                      request_id=frame.request_id, fingerprint=frame.fingerprint, step=frame.step)
                if frame.kind == FrameKind.FEDAVG_FETCH:
                    average = self.rounds.average(frame.step, frame.device_id)
                    return tensors_frame(FrameKind.FEDAVG_RESULT, [array_part(average)], request_id=frame.request_id,
                                         fingerprint=frame.fingerprint, step=frame.step)
                raise CodedError("bad_kind", f"a training server takes TRAIN_REQUEST (or TRUNK_REQUEST and "
                                             f"HEAD_GRADIENT) and FEDAVG frames, not {frame.kind.name}")
            except ProtocolError as e:
                return error_frame(CodedError("bad_request", str(e)), **frame.reply_fields())
            except CodedError as e:
                return error_frame(e, **frame.reply_fields())

    def _check_protocol(self, kind: FrameKind) -> None:
        private = kind != FrameKind.TRAIN_REQUEST
        if private != self.cfg.private_labels:
            raise CodedError("label_privacy", "this server trains " + (
                "label-private (U-shaped): start the device with --private-labels too" if self.cfg.private_labels
                else "with the labels sent to it: start the server with --private-labels too, or the device "
                     "without it"))

    def _ledger(self, frame: Frame, replies: str) -> tuple[DeviceLedger, Frame | None]:
        """The device's ledger, and the stored reply when `frame` repeats an applied step.
        Refuses a step that cannot be the next one."""
        ledger = self.ledgers.setdefault(frame.device_id, DeviceLedger())
        self.rounds.see(frame.device_id)
        s = frame.step
        if s <= ledger.step:
            stored = getattr(ledger, replies)
            if s in stored:  # a retry or a replay: the same reply, addressed to this request
                return ledger, dataclasses.replace(decode_frame(stored[s]), request_id=frame.request_id)
            raise CodedError("stale_step", f"step {s} of {frame.device_id} was applied and its reply dropped "
                                           f"(the device checkpointed after it); the server is at {ledger.step}")
        if s != ledger.step + 1:
            raise CodedError("step_gap", f"device {frame.device_id} sent step {s}, the server expects "
                                         f"{ledger.step + 1}")
        return ledger, None

    def _codes(self, part) -> torch.Tensor:
        split = self.model.split
        codes = torch.from_numpy(np.array(part.array()))  # a writable copy
        if split.quantizer == "fsq" and (part.levels != split.levels or codes.shape[-1] != split.code_dim):
            raise CodedError("bad_codec", f"expected {split.levels}-level codes of width {split.code_dim}")
        return codes

    def _train(self, frame: Frame, log: bool) -> Frame:
        ledger, stored = self._ledger(frame, "replies")
        if stored is not None:
            return stored
        req = parse_train_request(frame)
        codes = self._codes(req.codes)
        vocab = self.server.lm_head.out_features
        if int(req.labels.max(initial=0)) >= vocab:
            raise CodedError("bad_request", f"an answer id is outside the vocabulary of {vocab}")
        if log and self._wal is not None:  # before the reply: a crash after this replays the step
            self._wal.append(encode_frame(frame))
        self._lr()
        step = server_step(self.server, self.server.receive(codes), torch.from_numpy(req.labels),
                           torch.from_numpy(req.attention_mask))
        reply = self._gradient_reply(frame, step.grad, {"loss": step.loss, "token_accuracy": step.token_accuracy})
        return self._applied(ledger, frame, reply, req.ckpt_step, log)

    def _trunk(self, frame: Frame, log: bool) -> Frame:
        """Label-private, first exchange: the trunk's hidden states at the output positions.
        Logged too: a restart replays the forward in its place among the other steps."""
        ledger, stored = self._ledger(frame, "hidden_replies")
        if stored is not None:
            return stored
        if ledger.pending is not None and ledger.pending.step == frame.step:  # a retry: the same hidden states
            return dataclasses.replace(decode_frame(ledger.pending.reply), request_id=frame.request_id)
        values, hidden = self._trunk_forward(frame)
        if log and self._wal is not None:
            self._wal.append(encode_frame(frame))
        part = array_part(hidden.detach().numpy().astype(np.float32)) if self.cfg.hidden_codec == "fp32" else \
            gradient_part(hidden.detach().numpy(), self.cfg.hidden_codec, self.rng)
        reply = tensors_frame(FrameKind.TRUNK_HIDDEN, [part, json_part({})], request_id=frame.request_id,
                              fingerprint=frame.fingerprint, step=frame.step)
        ledger.pending = TrunkPass(frame.step, frame, encode_frame(reply), self.server_steps, values, hidden)
        return reply

    def _trunk_forward(self, frame: Frame):
        req = parse_trunk_request(frame)
        return trunk_forward(self.server, self.server.receive(self._codes(req.codes)),
                             torch.from_numpy(req.attention_mask), torch.from_numpy(req.positions))

    def _head(self, frame: Frame, log: bool) -> Frame:
        """Label-private, second exchange: backward from the device's gradient; applies the step."""
        ledger, stored = self._ledger(frame, "replies")
        if stored is not None:
            return stored
        p = ledger.pending
        if p is None or p.step != frame.step:
            raise CodedError("resubmit", f"no trunk pass of step {frame.step} of {frame.device_id} is pending (the "
                                         "server restarted): send its TRUNK_REQUEST again")
        try:
            grad = hidden_part_of(frame, FrameKind.HEAD_GRADIENT, rows=p.hidden.shape[0])
        except ProtocolError as e:
            raise CodedError("bad_request", str(e)) from None
        if grad.shape[1] != p.hidden.shape[1] or not np.isfinite(grad).all():
            raise CodedError("bad_request", f"HEAD_GRADIENT of width {grad.shape[1]} for hidden states of width "
                                            f"{p.hidden.shape[1]}, or not finite")
        if log and self._wal is not None:  # its TRUNK_REQUEST is in the log already, or the pass in the checkpoint
            self._wal.append(encode_frame(frame))
        values, hidden = (p.values, p.hidden) if p.version == self.server_steps else self._trunk_forward(p.request)
        self._lr()
        hidden.backward(torch.from_numpy(grad).to(hidden.dtype))
        reply = self._gradient_reply(frame, values.grad, {})
        ledger.pending = None
        ledger.hidden_replies[frame.step] = p.reply
        return self._applied(ledger, frame, reply, parse_trunk_request(p.request).ckpt_step, log)

    def _lr(self) -> None:
        for g in self.opt.param_groups:  # the schedule runs over the devices' steps, not the sum of them
            g["lr"] = lr_at(self.server_steps // max(1, self.rounds.num_devices), self.cfg)
        self.opt.zero_grad(set_to_none=True)

    def _gradient_reply(self, frame: Frame, grad: torch.Tensor, body: dict) -> Frame:
        """After the backward: the optimizer step, and the GRADIENT at the cut."""
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        grad = grad.numpy()
        body = {**body, "server_step": self.server_steps + 1}
        g_part = array_part(grad.astype(np.float32)) if self.cfg.grad_codec == "fp32" else \
            gradient_part(grad, self.cfg.grad_codec, self.rng)
        return tensors_frame(FrameKind.GRADIENT, [g_part, json_part(body)], request_id=frame.request_id,
                             fingerprint=frame.fingerprint, step=frame.step)

    def _applied(self, ledger: DeviceLedger, frame: Frame, reply: Frame, ckpt_step: int, log: bool) -> Frame:
        s = frame.step
        ledger.step = s
        ledger.applied += 1
        ledger.replies[s] = encode_frame(reply)
        for stored in (ledger.replies, ledger.hidden_replies):
            for k in [k for k in stored if k <= ckpt_step and k != s]:
                del stored[k]  # the device can no longer need these
        self.server_steps += 1
        if log and self.state_dir is not None and self.server_steps % self.cfg.checkpoint_every == 0:
            self.save()
        return reply

    # ---------------------------------------------------------------- checkpoint, log, restore
    def save(self) -> None:
        with self._lock:
            opt_t, opt_meta = optimizer_tensors(self.opt)
            tensors = {**{f"server.{k}": v for k, v in self.server.state_dict().items()}, **opt_t}
            replies = []
            for device_id, ledger in self.ledgers.items():
                for which, stored in (("gradient", ledger.replies), ("hidden", ledger.hidden_replies)):
                    for s, data in stored.items():
                        tensors[f"reply.{len(replies)}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        replies.append([device_id, s, which])
            pending = []  # label-private passes between their two exchanges: the log is cleared below
            for device_id, ledger in self.ledgers.items():
                if ledger.pending is not None:
                    for what, data in (("request", encode_frame(ledger.pending.request)), ("reply", ledger.pending.reply)):
                        tensors[f"pending.{len(pending)}.{what}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    pending.append([device_id, ledger.pending.version])
            meta = {"server_steps": self.server_steps, "optimizer": opt_meta, "rng": self.rng.bit_generator.state,
                    "devices": {d: {"step": led.step, "applied": led.applied} for d, led in self.ledgers.items()},
                    "replies": replies, "pending": pending}
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
            for i, (device_id, s, *which) in enumerate(meta["replies"]):
                led = self.ledgers[device_id]
                stored = led.hidden_replies if which == ["hidden"] else led.replies
                stored[s] = tensors[f"reply.{i}"].numpy().tobytes()
            for i, (device_id, version) in enumerate(meta.get("pending", [])):
                request = decode_frame(tensors[f"pending.{i}.request"].numpy().tobytes())
                values, hidden = self._trunk_forward(request)
                self.ledgers[device_id].pending = TrunkPass(request.step, request,
                                                            tensors[f"pending.{i}.reply"].numpy().tobytes(), version,
                                                            values, hidden)
        wal = self.state_dir / WAL_FILE
        frames, whole = WriteAheadLog.replay(wal)
        for frame in frames:  # in the order the frames came: the same forwards, and the same random draws
            if frame.step != self.ledgers.get(frame.device_id, DeviceLedger()).step + 1:
                continue
            if frame.kind == FrameKind.TRAIN_REQUEST:
                self._train(frame, log=False)
            elif frame.kind == FrameKind.TRUNK_REQUEST:
                self._trunk(frame, log=False)
            elif frame.kind == FrameKind.HEAD_GRADIENT:
                self._head(frame, log=False)
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
