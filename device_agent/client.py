"""The device side of split inference. Never imports torch: ONNX Runtime, numpy,
Pillow, tokenizers and paho-mqtt only.

    DeviceClient(bundle).ask(transport, image, prompt)
      1. preprocess the image and tokenise the prompt exactly as the manifest says;
      2. run the client prefill graph -> integer codes (and, cut > 0, the KV cache);
      3. send the packed codes; at cut > 0 answer each NEXT_TOKEN with the codes of
         that token from the decode-step graph, until the server sends the ANSWER.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from edgeqtl.bundle import BundleManifest
from edgeqtl.errors import RemoteError
from edgeqtl.imageproc import load_image, preprocess
from edgeqtl.prompt import PromptEncoder, PromptError
from edgeqtl.transport import RequestTimeout
from edgeqtl.wire import (Frame, FrameKind, array_frame, codes_frame, encode_frame, header_nbytes, new_request_id,
                          raise_if_error)

from .session import open_session

log = logging.getLogger("edgeqtl.device")

@dataclasses.dataclass
class Answer:
    text: str
    tokens: int
    latency_s: float
    bytes_up: int  # frames sent, headers included
    bytes_up_fp16: int  # the same frames carrying 16-bit hidden states instead, headers included
    round_trips: int
    restarts: int = 0  # generations started again after their server agent died


class DeviceClient:
    def __init__(self, bundle_dir: str | Path, variant: str | None = None, threads: int | None = None,
                 entropy: bool = True):
        """entropy=False: send plainly packed codes even when the bundle has an entropy model."""
        self.dir = Path(bundle_dir)
        self.manifest = m = BundleManifest.load(self.dir)
        self.variant = variant or m.graph("prefill").variant  # fp32 first where there is one
        m.check_files(self.dir)  # every file there at its size: a truncated copy is named, not run
        self.prompts = PromptEncoder.from_bundle(self.dir, m.text)
        self.entropy = m.entropy_model if entropy else None
        self.prefill = open_session(self.dir / m.graph("prefill", self.variant).file, m.target, threads)
        self.decode = open_session(self.dir / m.graph("decode", self.variant).file, m.target, threads) if m.cut else None

    # ---------------------------------------------------------------- the client half
    def encode(self, image, prompt: str):
        """-> (wire array (1, T, D), attention mask (1, T), KV cache list)."""
        img = load_image(image) if isinstance(image, (str, Path)) else image
        pix = preprocess(img, self.manifest.image)
        ids, mask = self.prompts.encode([prompt])
        limit = self.manifest.max_context
        if limit is not None and ids.shape[1] >= limit:  # refused here, before any byte is sent
            raise PromptError(f"prompt_too_long: the prompt is {ids.shape[1]} tokens and the model's context is "
                              f"{limit} (its answer needs room too); shorten the prompt")
        out = self.prefill.run(None, {"pixel_values": pix, "input_ids": ids, "attention_mask": mask})
        return out[0], mask, out[1:]

    def encode_token(self, token_id: int, mask: np.ndarray, past: list):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        feeds = {"input_ids": np.array([[token_id]], np.int64), "attention_mask": mask}
        for i in range(self.manifest.cut):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        out = self.decode.run(None, feeds)
        return out[0], mask, out[1:]

    def frame(self, kind: FrameKind, wire: np.ndarray, request_id: bytes, step: int) -> Frame:
        m = self.manifest
        fields = dict(request_id=request_id, fingerprint=m.fingerprint_bytes, step=step)
        if m.quantizer == "fsq":
            return codes_frame(kind, wire, m.levels, entropy=self.entropy, **fields)
        return array_frame(kind, wire.astype(np.float16), **fields)

    # ---------------------------------------------------------------- one question
    def ask(self, transport, image, prompt: str, timeout: float = 10.0, retries: int = 2,
            restarts: int = 2) -> Answer:
        """`transport` is a started edgeqtl.transport.RequestClient.

        At cut > 0 a generation lives on one server agent; if that agent dies mid-answer
        (its decode step times out, or it no longer knows the session) the generation
        starts again from the prompt on whichever agent takes it, at most `restarts` times.
        """
        t0 = time.perf_counter()
        wire, mask, past = self.encode(image, prompt)
        sent = _Sent()
        for attempt in range(restarts + 1):
            try:
                return dataclasses.replace(self._generate(transport, wire, mask, past, timeout, retries, t0, sent),
                                           restarts=attempt)
            except _SessionLost as lost:
                if attempt == restarts:
                    raise lost.error from None
                log.warning("generation lost mid-answer (%s); starting again from the prompt", lost.error)
        raise AssertionError("unreachable")

    def _generate(self, transport, wire, mask, past, timeout, retries, t0, sent: "_Sent") -> Answer:
        rid = new_request_id()
        frame = self.frame(FrameKind.INFER_REQUEST, wire, rid, 0)
        server_id = None
        while True:
            frame = transport.address(frame)  # as sent, so that the byte count has the whole header
            sent.up += len(encode_frame(frame))
            sent.fp16 += header_nbytes(frame) + frame.shape[1] * self.manifest.hidden_size * 2
            try:
                # Decode steps go to one server: no retries there, a silent one has lost the session.
                reply = transport.request(frame, timeout=timeout, retries=0 if server_id else retries,
                                          server_id=server_id)
            except RequestTimeout as e:
                if server_id is None:
                    raise
                raise _SessionLost(e) from None
            sent.trips += 1
            try:
                raise_if_error(reply)
            except RemoteError as error:
                if error.code == "unknown_session":
                    raise _SessionLost(error) from None
                raise
            if reply.kind == FrameKind.ANSWER:
                a = reply.json()
                return Answer(a["text"], a["tokens"], time.perf_counter() - t0, sent.up, sent.fp16, sent.trips)
            if reply.kind != FrameKind.NEXT_TOKEN or self.decode is None:
                raise RemoteError("protocol", f"unexpected {reply.kind.name} reply")
            nxt = reply.json()
            server_id = nxt.get("server") or None
            wire, mask, past = self.encode_token(int(nxt["token_id"]), mask, past)
            frame = self.frame(FrameKind.DECODE_STEP, wire, rid, int(nxt["step"]))


@dataclasses.dataclass
class _Sent:
    """What one question has cost so far, restarts included."""
    up: int = 0
    fp16: int = 0
    trips: int = 0


class _SessionLost(Exception):
    def __init__(self, error: Exception):
        self.error = error
