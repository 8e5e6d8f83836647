"""Greedy generation on the server half, frame in, frame out.

cut = 0: the device sends the quantized prompt; the server also holds a token encoder
(the embedding table and the quantizer encoder, nothing private), so it generates the
whole answer on its own: one round trip per question.

cut > 0: the device's layers hold a KV cache, so each new token is a round trip:
    INFER_REQUEST (prompt codes)  -> NEXT_TOKEN {token_id, step: 1}
    DECODE_STEP   (codes, step k) -> NEXT_TOKEN {token_id, step: k + 1} ... -> ANSWER
The server keeps each session's KV cache of its own layers until the answer or a timeout.
Every reply carries the step of the request it answers (the frame's `step` field), so a
late duplicate of an earlier step's reply is never mistaken for the current one.

Every defect in a request becomes an ERROR frame with a code and a one-line message;
nothing a device sends can stop the engine serving others.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch

from edgeqtl.wire import Codec, Frame, FrameKind, ProtocolError, json_frame
from edgeqtl.codec import CodecError
from edgeqtl.models.split import KVCache


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Session:
    cache: KVCache
    mask: torch.Tensor  # (1, tokens so far)
    tokens: list[int]
    step: int
    deadline: float


class GenerationEngine:
    def __init__(self, bundle, tokenizer, eos_token_id: int, max_new_tokens: int = 8, max_context: int = 2048,
                 session_timeout: float = 60.0, device: str = "cpu"):
        self.bundle = bundle
        self.server = bundle.server.to(device).eval()
        self.token_encoder = bundle.token_encoder.to(device).eval() if bundle.token_encoder is not None else None
        self.split = bundle.split
        self.tok = tokenizer
        self.eos = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context
        self.session_timeout = session_timeout
        self.device = device
        self.sessions: dict[tuple[str, bytes], Session] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- validation
    def wire_tensor(self, frame: Frame, expect_tokens: int | None = None) -> torch.Tensor:
        s = self.split
        if s.quantizer == "fsq":
            if frame.codec != Codec.CODES or frame.levels != s.levels:
                raise RequestError("bad_codec", f"expected {s.levels}-level codes, got {frame.codec.name} "
                                                f"with {frame.levels} levels")
        elif frame.codec != Codec.FLOAT16:
            raise RequestError("bad_codec", f"expected FLOAT16 hidden states, got {frame.codec.name}")
        width = s.code_dim if s.quantizer == "fsq" else self.bundle.meta["hidden_size"]
        if len(frame.shape) != 3 or frame.shape[0] != 1 or frame.shape[2] != width:
            raise RequestError("bad_shape", f"expected codes of shape (1, tokens, {width}), got {list(frame.shape)}")
        if expect_tokens is not None and frame.shape[1] != expect_tokens:
            raise RequestError("bad_shape", f"a decode step carries {expect_tokens} token, got {frame.shape[1]}")
        if frame.shape[1] > self.max_context:
            raise RequestError("prompt_too_long", f"prompt of {frame.shape[1]} tokens exceeds the server's context "
                                                  f"of {self.max_context}")
        try:
            arr = frame.array()
        except (CodecError, ProtocolError) as e:
            raise RequestError("bad_codes", str(e)) from None
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    # ---------------------------------------------------------------- model steps
    @torch.no_grad()
    def _forward(self, wire: torch.Tensor, session: Session) -> int:
        logits = self.server(wire, session.mask, session.cache)
        return int(logits[0, -1].argmax())

    def _done(self, session: Session) -> bool:
        return session.tokens[-1] == self.eos or len(session.tokens) >= self.max_new_tokens \
            or session.mask.shape[1] >= self.max_context

    def _answer(self, frame: Frame, session: Session) -> Frame:
        ids = [t for t in session.tokens if t != self.eos]
        return json_frame(FrameKind.ANSWER, {"text": self.tok.decode(ids), "tokens": len(ids), "token_ids": ids},
                          request_id=frame.request_id, fingerprint=frame.fingerprint, step=frame.step)

    # ---------------------------------------------------------------- frames
    def handle(self, frame: Frame) -> Frame:
        try:
            if frame.fingerprint != self.bundle.fingerprint_bytes:
                raise RequestError("fingerprint_mismatch",
                                   f"bundle fingerprint {frame.fingerprint.hex()} does not match this server's "
                                   f"{self.bundle.fingerprint_bytes.hex()}: export the device bundle and the server "
                                   "half together and deploy both")
            if frame.kind == FrameKind.INFER_REQUEST:
                return self._prefill(frame)
            if frame.kind == FrameKind.DECODE_STEP:
                return self._decode(frame)
            raise RequestError("bad_kind", f"a server agent takes INFER_REQUEST and DECODE_STEP, not {frame.kind.name}")
        except RequestError as e:
            return json_frame(FrameKind.ERROR, {"code": e.code, "message": str(e)}, request_id=frame.request_id,
                              fingerprint=frame.fingerprint, step=frame.step)

    def _prefill(self, frame: Frame) -> Frame:
        wire = self.wire_tensor(frame)
        session = Session(KVCache(), torch.ones(1, wire.shape[1], dtype=torch.long, device=self.device), [], 0,
                          time.time() + self.session_timeout)
        session.tokens.append(self._forward(wire, session))
        session.step = 1
        if self.split.cut == 0:  # generate on our own
            while not self._done(session):
                t = torch.tensor([[session.tokens[-1]]], device=self.device)
                session.mask = torch.cat([session.mask, session.mask.new_ones(1, 1)], dim=1)
                session.tokens.append(self._forward(self.token_encoder(t), session))
                session.step += 1
            return self._answer(frame, session)
        if self._done(session):
            return self._answer(frame, session)
        with self._lock:
            self._expire()
            self.sessions[(frame.device_id, frame.request_id)] = session
        return self._next(frame, session)

    def _decode(self, frame: Frame) -> Frame:
        with self._lock:
            session = self.sessions.get((frame.device_id, frame.request_id))
        if session is None:
            raise RequestError("unknown_session", "no open generation for this request (expired or never started); "
                                                  "send the prompt again")
        if frame.step != session.step:
            raise RequestError("bad_step", f"expected decode step {session.step}, got {frame.step}")
        wire = self.wire_tensor(frame, expect_tokens=1)
        session.mask = torch.cat([session.mask, session.mask.new_ones(1, 1)], dim=1)
        session.tokens.append(self._forward(wire, session))
        session.step += 1
        session.deadline = time.time() + self.session_timeout
        if self._done(session):
            with self._lock:
                self.sessions.pop((frame.device_id, frame.request_id), None)
            return self._answer(frame, session)
        return self._next(frame, session)

    def _next(self, frame: Frame, session: Session) -> Frame:
        return json_frame(FrameKind.NEXT_TOKEN, {"token_id": session.tokens[-1], "step": session.step},
                          request_id=frame.request_id, fingerprint=frame.fingerprint, step=frame.step)

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.deadline < now]:
            del self.sessions[key]
