"""The device side of split inference. Never imports torch: ONNX Runtime, numpy,
Pillow, tokenizers and paho-mqtt only.

    DeviceClient(bundle).ask(transport, image, prompt)
      1. preprocess the image and tokenise the prompt exactly as the manifest says;
      2. run the client prefill graph -> integer codes (and, cut > 0, the KV cache);
      3. send the packed codes; at cut > 0 answer each NEXT_TOKEN with the codes of
         that token from the decode-step graph, until the server sends the ANSWER.

A request may carry options (InferOptions: max new tokens, sampling, stop strings,
streaming). A second question about the same image, to a server that confirmed it kept
the image's codes, names them by digest instead of sending them again; a miss (expired,
another server, a server restarted) costs one resend in full, never a wrong answer.
Options and references make the request a version 2 frame; a version 1 server refuses it
naming both versions, and the device then asks again the version 1 way if nothing it
needs is lost (the image reference), or says which option the old server cannot honour.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from edgeqtl.bundle import BundleManifest
from edgeqtl.errors import RemoteError
from edgeqtl.imageproc import load_image, preprocess
from edgeqtl.prompt import PromptEncoder, PromptError
from edgeqtl.tiling import TileSpec, anyres_index, anyres_views, split_image, tiles_text, tiling_from_dict
from edgeqtl.transport import RequestTimeout
from edgeqtl.wire import (Frame, FrameKind, ImageRef, InferOptions, array_part, codes_part, encode_frame,
                          frame_of, header_nbytes, image_digest, infer_request_frame, new_request_id, raise_if_error)

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
    first_token_s: float | None = None  # from the question to its first token on the device
    token_ids: list[int] = dataclasses.field(default_factory=list)
    image_by_reference: bool = False  # the image's codes were not sent again


class DeviceClient:
    def __init__(self, bundle_dir: str | Path, variant: str | None = None, threads: int | None = None,
                 entropy: bool = True, reuse_images: bool = True):
        """entropy=False: send plainly packed codes even when the bundle has an entropy model.
        reuse_images=False: always send the image's codes (and plain version 1 requests)."""
        self.dir = Path(bundle_dir)
        self.manifest = m = BundleManifest.load(self.dir)
        self.variant = variant or m.graph("prefill").variant  # fp32 first where there is one
        m.check_files(self.dir)  # every file there at its size: a truncated copy is named, not run
        self.prompts = PromptEncoder.from_bundle(self.dir, m.text)
        self.entropy = m.entropy_model if entropy else None
        self.prefill = open_session(self.dir / m.graph("prefill", self.variant).file, m.target, threads)
        self.decode = open_session(self.dir / m.graph("decode", self.variant).file, m.target, threads) if m.cut else None
        self.reuse_images = reuse_images
        self._images: dict[str, tuple[str | None, float]] = {}  # digest -> (server holding it, until when)

    # ---------------------------------------------------------------- the client half
    def encode(self, image, prompt: str):
        """-> (wire array (1, T, D), attention mask (1, T), KV cache list). A prompt-ids
        bundle (cut 0) gives the image positions' codes alone, (1, N, D)."""
        wire, _, mask, past, _ = self._encode(image, prompt)
        return wire, mask, past

    def _encode(self, image, prompt: str):
        """encode(), with the prompt's ids (1, T) and, where the bundle's token reducer keeps
        the image tokens' original positions, those positions (K,) (else None): -> (wire,
        ids, mask, past, kept). The mask then has the position steps the graph used."""
        img = load_image(image) if isinstance(image, (str, Path)) else image
        tiling, feeds = tiling_from_dict(self.manifest.image_tiling), {}
        if tiling is not None:
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        if isinstance(tiling, TileSpec):  # SmolVLM's splitting: tiles + the global view, one batch through the graph
            pix, rows, cols = split_image(img, self.manifest.image, tiling)
            ids, mask = self.prompts.encode([prompt], tiles_text(rows, cols, self.prompts.image_token, tiling),
                                            rows * cols * tiling.tokens_per_tile)
        elif tiling is not None:  # OneVision's any-resolution: base view + tiles, laid out by an index
            pix, rows, cols = anyres_views(img, self.manifest.image, tiling)
            feeds["image_index"] = anyres_index(img.height, img.width, rows, cols, tiling)
            extra = len(feeds["image_index"]) - self.prompts.image_token_count
            ids, mask = self.prompts.encode([prompt], self.prompts.image_token * extra, extra)
        else:
            pix = preprocess(img, self.manifest.image)
            ids, mask = self.prompts.encode([prompt])
        limit = self.manifest.max_context
        if limit is not None and ids.shape[1] >= limit:  # refused here, before any byte is sent
            raise PromptError(f"prompt_too_long: the prompt is {ids.shape[1]} tokens and the model's context is "
                              f"{limit} (its answer needs room too); shorten the prompt")
        if not self.manifest.prompt_ids:
            feeds.update(input_ids=ids, attention_mask=mask)
        names = [o.name for o in self.prefill.get_outputs()]
        out = dict(zip(names, self.prefill.run(None, {"pixel_values": pix, **feeds})))
        kept = out["image_positions"][0] if "image_positions" in out else None
        if self.manifest.prompt_ids:
            codes = out["codes"]  # (views, tokens, D): one image, in order
            return codes.reshape(1, -1, codes.shape[-1]), ids, mask, [], kept
        past = [out[n] for n in names if n.startswith("present_")]
        return out["codes"], ids, out.get("position_mask", mask), past, kept

    def encode_token(self, token_id: int, mask: np.ndarray, past: list):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        feeds = {"input_ids": np.array([[token_id]], np.int64), "attention_mask": mask}
        for i in range(self.manifest.cut):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        out = self.decode.run(None, feeds)
        return out[0], mask, out[1:]

    def part(self, wire: np.ndarray):
        m = self.manifest
        if m.quantizer == "fsq" and wire.size == 0:  # an image by reference under prompt ids: no codes at all
            return codes_part(wire, m.levels)
        if m.quantizer == "fsq":
            return codes_part(wire, m.levels, entropy=self.entropy)
        return array_part(wire.astype(np.float16))

    def frame(self, kind: FrameKind, wire: np.ndarray, request_id: bytes, step: int) -> Frame:
        return frame_of(kind, self.part(wire), request_id=request_id, fingerprint=self.manifest.fingerprint_bytes,
                        step=step)

    def image_span(self, ids: np.ndarray) -> tuple[int, int] | None:
        """(first position, count) of the image tokens in a one-row prompt, when they are
        one run or go with prompt ids (else None: the image is not sent by reference)."""
        where = np.flatnonzero(ids[0] == self.prompts.image_token_id)
        if not len(where):
            return None
        if where[-1] - where[0] + 1 != len(where) and not self.manifest.prompt_ids:
            return None  # with prompt ids the server finds the image's positions itself (a split image's are not one run)
        return int(where[0]), len(where)

    def prompt_request(self, wire: np.ndarray, ids: np.ndarray, options: InferOptions, request_id: bytes,
                       full: bool = False, kept: np.ndarray | None = None) -> tuple[Frame, str | None, bool]:
        """The INFER_REQUEST for a prompt's `wire` and `ids` (1, T), the server to send it
        to (None: the shared topic) and whether it names the image by reference (never
        with full=True). With prompt ids the codes are the image's alone and the ids go too.
        kept: the image tokens' original positions (_encode), which go with the image."""
        m = self.manifest
        fields = dict(request_id=request_id, fingerprint=m.fingerprint_bytes)
        prompt_ids = ids[0] if m.prompt_ids else None
        span = self.image_span(ids) if m.quantizer == "fsq" or kept is not None else None
        if span is None or not (self.reuse_images or kept is not None):
            return infer_request_frame(self.part(wire), options, prompt_ids, **fields), None, False
        at, n = span
        if kept is not None:  # FastV sends K of the prompt's N image rows (the tower reducers' prompts hold K)
            n = len(kept)
        image = wire[0] if m.prompt_ids else wire[0, at:at + n]
        digest = image_digest(image)
        placed = {} if kept is None else {"span": int(m.image_reduction["span"]), "kept": tuple(int(i) for i in kept)}
        held = self._images.get(digest) if self.reuse_images else None
        if not full and held is not None and held[1] > time.monotonic():
            rest = wire[:, :0] if m.prompt_ids else np.concatenate([wire[:, :at], wire[:, at + n:]], axis=1)
            options = dataclasses.replace(options, image=ImageRef(at, n, digest, by_reference=True, **placed))
            return infer_request_frame(self.part(rest), options, prompt_ids, **fields), held[0], True
        if full:
            self._images.pop(digest, None)
        options = dataclasses.replace(options, image=ImageRef(at, n, digest, **placed))
        return infer_request_frame(self.part(wire), options, prompt_ids, **fields), None, False

    def forget_server(self, server_id: str | None) -> None:
        """Drop every image reference held by `server_id` (it stopped answering)."""
        for digest in [d for d, (held_by, _) in self._images.items() if held_by == server_id]:
            del self._images[digest]

    def request_frame(self, image, prompt: str, options: InferOptions = InferOptions(),
                      request_id: bytes | None = None) -> Frame:
        """The INFER_REQUEST of one question, whole (no image by reference): for drivers
        and tests that talk to a server frame by frame."""
        wire, ids, _, _, kept = self._encode(image, prompt)
        saved, self.reuse_images = self.reuse_images, False
        try:
            return self.prompt_request(wire, ids, options, request_id or new_request_id(), kept=kept)[0]
        finally:
            self.reuse_images = saved

    # ---------------------------------------------------------------- one question
    def ask(self, transport, image, prompt: str, timeout: float = 10.0, retries: int = 2, restarts: int = 2,
            options: InferOptions | None = None, on_token: Callable[[list[int]], None] | None = None) -> Answer:
        """`transport` is a started edgeqtl.transport.RequestClient.

        options: generation settings for this question (None: the server's defaults).
        on_token(ids): called with each new piece of the answer as it arrives (at cut 0
        when options.stream is set; at cut > 0 every token is a round trip anyway).

        At cut > 0 a generation lives on one server agent; if that agent dies mid-answer
        (its decode step times out, or it no longer knows the session) the generation
        starts again from the prompt on whichever agent takes it, at most `restarts` times.
        """
        t0 = time.perf_counter()
        wire, ids, mask, past, kept = self._encode(image, prompt)
        sent = _Sent(tokens=_Tokens(on_token, t0))
        options = options or InferOptions()
        for attempt in range(restarts + 1):
            try:
                return dataclasses.replace(self._generate(transport, wire, mask, past, ids, kept, options, timeout,
                                                          retries, t0, sent), restarts=attempt)
            except _SessionLost as lost:
                if attempt == restarts:
                    raise lost.error from None
                log.warning("generation lost mid-answer (%s); starting again from the prompt", lost.error)
        raise AssertionError("unreachable")

    def _generate(self, transport, wire, mask, past, ids, kept, options, timeout, retries, t0,
                  sent: "_Sent") -> Answer:
        rid = new_request_id()
        frame, server_id, by_ref = self.prompt_request(wire, ids, options, rid, kept=kept)
        sent.tokens.reset()
        while True:
            frame = transport.address(frame)  # as sent, so that the byte count has the whole header
            sent.up += len(encode_frame(frame))
            # the same positions as 16-bit hidden states, in a frame of their own
            positions = 1 if frame.kind == FrameKind.DECODE_STEP else ids.shape[1]
            sent.fp16 += header_nbytes(dataclasses.replace(frame, shape=(1, positions, 0))) + \
                positions * self.manifest.hidden_size * 2
            try:
                # Decode steps go to one server: no retries there, a silent one has lost the session.
                reply = transport.request(frame, timeout=timeout, retries=0 if server_id else retries,
                                          server_id=server_id, on_partial=sent.tokens.on_partial)
            except RequestTimeout as e:
                if by_ref and frame.kind == FrameKind.INFER_REQUEST:  # the server holding the image is gone
                    log.info("the server holding the image did not answer (%s); sending it again", e)
                    self.forget_server(server_id)  # its other images too: one wait, not one per image
                    rid = new_request_id()
                    frame, server_id, by_ref = self.prompt_request(wire, ids, options, rid, full=True, kept=kept)
                    continue
                if server_id is None:
                    raise
                raise _SessionLost(e) from None
            sent.trips += 1
            try:
                raise_if_error(reply)
            except RemoteError as error:
                if error.code == "unknown_session":
                    raise _SessionLost(error) from None
                # Both ask again under a new request id: servers answer a repeated id from their cache.
                if error.code == "image_not_cached" and by_ref:
                    log.info("image not held by the server (%s); sending it again", error)
                    rid = new_request_id()
                    frame, server_id, by_ref = self.prompt_request(wire, ids, options, rid, full=True, kept=kept)
                    continue
                if error.code == "bad_frame" and "version" in error.message and frame.codec.name == "TENSORS":
                    frame = self._as_version_1(wire, options, error, kept)
                    rid, server_id, by_ref = frame.request_id, None, False
                    continue
                raise
            if reply.kind == FrameKind.ANSWER:
                a = reply.json()
                if a.get("image_cached"):
                    ttl = float(a.get("image_ttl_s", 0))
                    self._images[str(a["image_cached"])] = (a.get("server") or None, time.monotonic() + 0.9 * ttl)
                ids = [int(t) for t in a.get("token_ids", [])]
                sent.tokens.final(ids)
                return Answer(a["text"], a["tokens"], time.perf_counter() - t0, sent.up, sent.fp16, sent.trips,
                              first_token_s=sent.tokens.first_s, token_ids=ids, image_by_reference=by_ref)
            if reply.kind != FrameKind.NEXT_TOKEN or self.decode is None:
                raise RemoteError("protocol", f"unexpected {reply.kind.name} reply")
            nxt = reply.json()
            server_id = nxt.get("server") or None
            sent.tokens.add(len(sent.tokens.ids), [int(nxt["token_id"])])
            wire, mask, past = self.encode_token(int(nxt["token_id"]), mask, past)
            frame = self.frame(FrameKind.DECODE_STEP, wire, rid, int(nxt["step"]))

    def _as_version_1(self, wire, options: InferOptions, error: RemoteError, kept=None) -> Frame:
        """A server that speaks only version 1: ask the version 1 way when nothing asked
        for is lost (the image reference and streaming only save bytes and waiting), else say
        what it cannot do."""
        if self.manifest.prompt_ids:
            raise RemoteError("old_server", f"the server runs an older edgeqtl ({error.message}); this bundle sends "
                                            "prompt ids (protocol version 2): upgrade the server agent, or export "
                                            "the bundle with --prompt-codes")
        if kept is not None:
            raise RemoteError("old_server", f"the server runs an older edgeqtl ({error.message}); this bundle's "
                                            "token reducer keeps the image tokens' original positions, which go "
                                            "with the image (protocol version 2): upgrade the server agent")
        wanted = {k: v for k, v in options.to_json().items() if k not in ("image", "stream")}
        if wanted:
            raise RemoteError("old_server", f"the server runs an older edgeqtl ({error.message}); it cannot take "
                                            f"{', '.join(sorted(wanted))}: upgrade the server agent or drop them")
        log.warning("the server speaks only protocol version 1 (%s); sending plain requests", error.message)
        self.reuse_images = False
        return self.frame(FrameKind.INFER_REQUEST, wire, new_request_id(), 0)


class _Tokens:
    """The answer's tokens as they reach the device (streamed, or one per round trip)."""

    def __init__(self, on_token: Callable[[list[int]], None] | None, t0: float):
        self.on_token, self.t0 = on_token, t0
        self.ids: list[int] = []
        self.first_s: float | None = None

    def reset(self) -> None:  # a generation started again: what it says now is new
        self.ids = []

    def add(self, first: int, ids: list[int]) -> None:
        new = ids[len(self.ids) - first:] if first <= len(self.ids) else []  # a repeat or a gap adds nothing
        if not new:
            return
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.t0
        self.ids += new
        if self.on_token is not None:
            self.on_token(new)

    def on_partial(self, frame: Frame) -> None:
        body = frame.json()
        self.add(int(body.get("i", 0)), [int(t) for t in body.get("ids", [])])

    def final(self, ids: list[int]) -> None:
        self.add(0, ids)


@dataclasses.dataclass
class _Sent:
    """What one question has cost so far, restarts included."""
    up: int = 0
    fp16: int = 0
    trips: int = 0
    tokens: "_Tokens | None" = None


class _SessionLost(Exception):
    def __init__(self, error: Exception):
        self.error = error
