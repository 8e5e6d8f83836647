"""Generation on the server half, frame in, frame out.

cut = 0: the device sends the quantized prompt; the server also holds a token encoder
(the embedding table and the quantizer encoder, nothing private), so it generates the
whole answer on its own: one round trip per question. A split with `exact_text` (an
adapted pretrained model) takes the prompt as ids only: its text enters the trunk as the
embeddings themselves, and only the image's codes pass through the quantizer decoder.

cut > 0: the device's layers hold a KV cache, so each new token is a round trip:
    INFER_REQUEST (prompt codes)  -> NEXT_TOKEN {token_id, step: 1}
    DECODE_STEP   (codes, step k) -> NEXT_TOKEN {token_id, step: k + 1} ... -> ANSWER
The server keeps each session's KV cache of its own layers until the answer or a timeout;
NEXT_TOKEN names the server ("server"), and the device sends the decode steps to that
server's own topic, since no other agent of the shared group holds the cache.
Requests that arrive together are answered as one batch (`handle_batch`).
Every reply carries the step of the request it answers (the frame's `step` field), so a
late duplicate of an earlier step's reply is never mistaken for the current one.

Each request decodes with the checkpoint's own settings (every end id, its defaults),
overridden by the request's options within the server's limits (sampling.py). With
`stream` set, at cut 0, TOKENS frames carry the answer's tokens as they are made
(`emit`, wired to the transport by the agent); the ANSWER still carries all of them. An
image sent once can be named by digest in later requests (image_cache.py).

Every defect in a request becomes an ERROR frame with a code and a one-line message;
nothing a device sends can stop the engine serving others.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np
import torch

from typing import Callable

from edgeqtl.codec import EntropyModel
from edgeqtl.errors import CodedError
from edgeqtl.wire import (Codec, Frame, FrameKind, Part, ProtocolError, error_frame, image_digest, json_frame,
                          parse_infer_request, tokens_frame)
from edgeqtl.models.split import KVCache, last_positions, position_mask

from .image_cache import ImageCache
from .sampling import Decoding, GenerationSettings

log = logging.getLogger("edgeqtl.server")


@dataclasses.dataclass
class Session:
    cache: KVCache | None
    mask: torch.Tensor  # (1, tokens so far): each token's position step (models.split.position_mask)
    tokens: list[int]
    step: int
    deadline: float
    decoding: Decoding
    frame: Frame  # the request: replies and streamed tokens are addressed from it
    image_cached: str | None = None  # the digest of the image codes kept for the device's next question
    streamed: int = 0  # tokens sent in TOKENS frames so far
    stopped: bool = False  # a stop string was generated


class GenerationEngine:
    def __init__(self, bundle, tokenizer, settings: GenerationSettings | int, max_new_tokens: int | None = None,
                 max_context: int = 2048, session_timeout: float = 60.0, device: str = "cpu",
                 max_batch_tokens: int | None = None, image_cache: ImageCache | None = None):
        """settings: the generation settings (or, as before them, one end-of-sequence id).
        max_new_tokens: a request's default, overriding the settings'.
        max_context: the model's own (its max_position_embeddings, from the export).
        max_batch_tokens: a prefill batch holds at most this many tokens, padding included
        (16 devices with 750-token prompts would otherwise be one 12,000-token pass)."""
        self.bundle = bundle
        self.server = bundle.server.to(device).eval()
        self.token_encoder = bundle.token_encoder.to(device).eval() if bundle.token_encoder is not None else None
        self.split = bundle.split
        self.tok = tokenizer
        if isinstance(settings, int):
            settings = GenerationSettings((settings,))
        if max_new_tokens is not None:
            settings = dataclasses.replace(settings, max_new_tokens=max_new_tokens,
                                           max_new_tokens_limit=max(max_new_tokens, settings.max_new_tokens_limit))
        self.settings = settings
        self.max_context = max_context
        self.max_batch_tokens = max_batch_tokens
        self.session_timeout = session_timeout
        self.device = device
        self.sessions: dict[tuple[str, bytes], Session] = {}
        entropy = bundle.meta.get("entropy")
        self.entropy = EntropyModel.from_list(entropy) if entropy is not None else None
        self.server_id: str | None = None  # set by the agent: where this generation's decode steps must go
        self.images = image_cache if image_cache is not None else ImageCache()
        self.image_token_id = bundle.meta.get("text", {}).get("image_token_id")
        # set by the agent: emit(request, TOKENS frame) publishes a streamed part of an answer
        self.emit: Callable[[Frame, Frame], None] | None = None
        self._lock = threading.Lock()

    @property
    def eos(self) -> int:
        """The first end-of-sequence id (the engine stops on every one of settings.eos_token_ids)."""
        return self.settings.eos_token_ids[0]

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    # ---------------------------------------------------------------- validation
    def wire_tensor(self, frame: Frame | Part, expect_tokens: int | None = None,
                    image_tokens: int = 0) -> np.ndarray:
        """The codes (or fp16 values) of a request, checked and decoded. image_tokens:
        positions the frame leaves out (an image by reference)."""
        s = self.split
        if s.quantizer == "fsq":
            accepted = (Codec.CODES, Codec.CODES_RANS) if self.entropy is not None else (Codec.CODES,)
            if frame.codec not in accepted or frame.levels != s.levels:
                raise CodedError("bad_codec", f"expected {s.levels}-level codes "
                                                f"({' or '.join(c.name for c in accepted)}), got {frame.codec.name} "
                                                f"with {frame.levels} levels")
        elif frame.codec != Codec.FLOAT16:
            raise CodedError("bad_codec", f"expected FLOAT16 hidden states, got {frame.codec.name}")
        width = s.code_dim if s.quantizer == "fsq" else self.bundle.meta["hidden_size"]
        if len(frame.shape) != 3 or frame.shape[0] != 1 or frame.shape[2] != width:
            raise CodedError("bad_shape", f"expected codes of shape (1, tokens, {width}), got {list(frame.shape)}")
        if expect_tokens is not None and frame.shape[1] != expect_tokens:
            raise CodedError("bad_shape", f"a decode step carries {expect_tokens} token, got {frame.shape[1]}")
        if frame.shape[1] + image_tokens > self.max_context:
            raise CodedError("prompt_too_long", f"prompt of {frame.shape[1] + image_tokens} tokens exceeds the "
                                                  f"server's context of {self.max_context}")
        try:
            return frame.array(self.entropy)
        except ProtocolError as e:
            raise CodedError("bad_codes", str(e)) from None

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        # a copy: the frame's array may be a read-only view of the message, which torch cannot wrap
        return torch.from_numpy(np.array(arr, copy=True)).to(self.device)

    def _prompt(self, frame: Frame) -> tuple[torch.Tensor, Decoding, str | None, torch.Tensor]:
        """An INFER_REQUEST's whole prompt (an image by reference spliced back in), its
        decoding, the digest of the image codes it leaves here for the next question, and
        its attention mask (1, T) with the image's position steps."""
        try:
            req = parse_infer_request(frame)
        except ProtocolError as e:
            raise CodedError("bad_options", str(e)) from None
        part, options = req.codes, req.options
        decoding = self.settings.resolve(options, frame.request_id)
        if req.prompt_ids is not None:
            wire, decoding, cached = self._with_prompt_ids(frame, req, decoding)
            return wire, decoding, cached, self._position_mask(options.image, req.prompt_ids == self.image_token_id)
        if self.split.exact_text:
            raise CodedError("bad_request", "this server half embeds the prompt's text itself (an adapted model: "
                                            "exact text at cut 0); send the prompt as ids, with a bundle exported "
                                            "with --prompt-ids")
        ref = options.image
        if ref is None:
            arr = self.wire_tensor(part)
            return self._tensor(arr), decoding, None, self._position_mask(None, np.zeros(arr.shape[1], bool))
        arr = self.wire_tensor(part, image_tokens=ref.tokens if ref.by_reference else 0)
        if ref.by_reference:
            if ref.at > arr.shape[1]:
                raise CodedError("bad_options", f"image position {ref.at} is past the {arr.shape[1]} positions sent")
            kept = self.images.get(frame.device_id, ref.digest)
            if kept is None or kept.shape[0] != ref.tokens:
                raise CodedError("image_not_cached", f"this server does not hold image {ref.digest[:12]} for "
                                                       f"{frame.device_id!r} (expired or never sent here); send the "
                                                       "image again")
            arr = np.concatenate([arr[:, :ref.at], kept[None].astype(arr.dtype), arr[:, ref.at:]], axis=1)
            return self._tensor(arr), decoding, ref.digest, self._position_mask(ref, self._image_at(ref, arr))
        if ref.at + ref.tokens > arr.shape[1]:
            raise CodedError("bad_options", f"image positions {ref.at}..{ref.at + ref.tokens} run past the "
                                            f"{arr.shape[1]} positions sent")
        span = arr[0, ref.at:ref.at + ref.tokens]
        cached = None
        if image_digest(span) == ref.digest and self.images.put(frame.device_id, ref.digest, span):
            cached = ref.digest
        else:
            log.info("image codes from %s not kept (digest differs or too large)", frame.device_id)
        return self._tensor(arr), decoding, cached, self._position_mask(ref, self._image_at(ref, arr))

    @staticmethod
    def _image_at(ref, arr: np.ndarray) -> np.ndarray:
        is_image = np.zeros(arr.shape[1], bool)
        is_image[ref.at:ref.at + ref.tokens] = True
        return is_image

    def _position_mask(self, ref, is_image: np.ndarray) -> torch.Tensor:
        """(1, T): 1 a token, or where the image keeps its original positions (ref.kept),
        the position steps the device's own graph used (models.split.position_mask)."""
        ones = torch.ones(1, len(is_image), dtype=torch.long, device=self.device)
        if ref is None or ref.kept is None:
            return ones
        if int(is_image.sum()) != ref.tokens:
            raise CodedError("bad_options", f"the image's kept positions name {ref.tokens} tokens; the prompt has "
                                            f"{int(is_image.sum())} image positions")
        mask = position_mask(ones, torch.from_numpy(is_image)[None].to(self.device),
                             torch.tensor([ref.kept], device=self.device), ref.span)
        if int(mask.sum()) > self.max_context:
            raise CodedError("prompt_too_long", f"the prompt takes {int(mask.sum())} positions (its image's "
                                                  f"{ref.span} among them); the server's context is {self.max_context}")
        return mask

    def _with_prompt_ids(self, frame: Frame, req, decoding: Decoding) -> tuple[torch.Tensor, Decoding, str | None]:
        """Prompt ids (cut 0): the text positions' codes from this half's own embedding
        table and quantizer encoder (what the device would have sent), the image
        positions' from the frame, or from the image kept for this device."""
        ids, ref = req.prompt_ids, req.options.image
        if self.token_encoder is None:
            raise CodedError("bad_request", f"prompt ids go to a cut-0 server half; this one is at cut {self.split.cut}")
        if not 0 < len(ids) <= self.max_context:
            raise CodedError("prompt_too_long", f"prompt of {len(ids)} tokens; this server's context is "
                                                  f"{self.max_context}")
        vocab = self.token_encoder.embed.num_embeddings
        is_image = ids == self.image_token_id
        if int(ids[~is_image].max(initial=0)) >= vocab:
            raise CodedError("bad_options", f"a prompt id past the vocabulary of {vocab}")
        n = int(is_image.sum())
        cached = None
        if ref is not None and ref.by_reference:
            image = self.images.get(frame.device_id, ref.digest)
            if image is None or image.shape[0] != n or req.codes.shape[1:2] != (0,):
                raise CodedError("image_not_cached", f"this server does not hold image {ref.digest[:12]} for "
                                                       f"{frame.device_id!r} (expired or never sent here); send the "
                                                       "image again")
            cached = ref.digest
        else:
            arr = self.wire_tensor(req.codes)
            if arr.shape[1] != n:
                raise CodedError("bad_shape", f"{n} image positions in the prompt ids, {arr.shape[1]} image codes sent")
            image = arr[0]
            if ref is not None and image_digest(image) == ref.digest and self.images.put(frame.device_id, ref.digest,
                                                                                        image):
                cached = ref.digest
        safe = torch.from_numpy(np.where(is_image, 0, ids).astype(np.int64))[None].to(self.device)
        with torch.no_grad():
            wire = self._encode_tokens(safe).clone()
            image = self._tensor(image)
            if self.split.exact_text:  # the server's input is hidden states: decode the image's codes here
                image = self.server.decoder_q(self.server.receive(image))
        wire[0, torch.from_numpy(is_image).to(self.device)] = image.to(wire.dtype)
        return wire, decoding, cached

    def _encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Text tokens as the trunk's input at cut 0: what the device would have sent (their
        codes) or, under exact_text, their own embeddings."""
        return self.token_encoder.embed(ids) if self.split.exact_text else self.token_encoder(ids)

    # ---------------------------------------------------------------- frames
    def handle(self, frame: Frame) -> Frame:
        return self.handle_batch([frame])[0]

    def handle_batch(self, frames: list[Frame]) -> list[Frame]:
        """Answer several requests (from different devices) with one forward pass per
        step: prompts are left-padded into one batch, decode steps of different sessions
        share one pass over their merged KV caches. A defect in one request becomes
        that request's ERROR frame; the others are answered."""
        replies: list[Frame | None] = [None] * len(frames)
        prefills, decodes = [], []
        for i, frame in enumerate(frames):
            try:
                prefills_or_decodes = self._admit(frame)
                (prefills if frame.kind == FrameKind.INFER_REQUEST else decodes).append((i, *prefills_or_decodes))
            except CodedError as e:
                replies[i] = self._error(frame, e)
        for group, run in [*((g, self._prefill) for g in self._by_tokens(prefills)), (decodes, self._decode)]:
            if not group:
                continue
            try:
                for (i, *_), reply in zip(group, run(group)):
                    replies[i] = reply
            except Exception:
                if len(group) == 1:
                    raise
                # One request broke the batch: answer each on its own, so the others still get theirs.
                log.exception("a batch of %d failed; answering its requests one by one", len(group))
                for item in group:
                    try:
                        replies[item[0]] = run([item])[0]
                    except Exception as e:  # noqa: BLE001 - reported to that device only
                        replies[item[0]] = self._error(item[1], CodedError("server_error", f"{type(e).__name__}: {e}"))
        return replies

    def _by_tokens(self, prefills: list[tuple]) -> list[list[tuple]]:
        """Prefill groups within max_batch_tokens, prompts of like length together."""
        if not self.max_batch_tokens:
            return [prefills]
        groups, current, longest = [], [], 0
        for item in sorted(prefills, key=lambda x: x[2].shape[1]):
            n = item[2].shape[1]
            if current and max(longest, n) * (len(current) + 1) > self.max_batch_tokens:
                groups.append(current)
                current, longest = [], 0
            current.append(item)
            longest = max(longest, n)
        return groups + ([current] if current else [])

    def _admit(self, frame: Frame) -> tuple:
        """Validate one request -> (frame, wire tensor[, session])."""
        if frame.fingerprint != self.bundle.fingerprint_bytes:
            raise CodedError("fingerprint_mismatch",
                               f"bundle fingerprint {frame.fingerprint.hex()} does not match this server's "
                               f"{self.bundle.fingerprint_bytes.hex()}: export the device bundle and the server "
                               "half together and deploy both")
        if frame.kind == FrameKind.INFER_REQUEST:
            return (frame, *self._prompt(frame))
        if frame.kind == FrameKind.DECODE_STEP:
            with self._lock:
                session = self.sessions.get((frame.device_id, frame.request_id))
            if session is None:
                raise CodedError("unknown_session", "no open generation for this request (expired or never "
                                                      "started); send the prompt again")
            if frame.step != session.step:
                raise CodedError("bad_step", f"expected decode step {session.step}, got {frame.step}")
            return frame, self._tensor(self.wire_tensor(frame, expect_tokens=1)), session
        raise CodedError("bad_kind", f"a server agent takes INFER_REQUEST and DECODE_STEP, not {frame.kind.name}")

    @staticmethod
    def _error(frame: Frame, e: CodedError) -> Frame:
        return error_frame(e, **frame.reply_fields())

    # ---------------------------------------------------------------- model steps
    @torch.no_grad()
    def _logits(self, wire: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.split.exact_text:  # hidden states at the cut (_with_prompt_ids)
            return self.server.forward_hidden(wire, mask, cache, last_positions(wire))[:, -1]
        return self.server.next_logits(wire, mask, cache)

    def _add(self, s: Session, logits_row: torch.Tensor) -> None:
        """Pick and append the session's next token; check its stop strings."""
        s.tokens.append(s.decoding.pick(logits_row, s.tokens))
        if s.decoding.stop and s.tokens[-1] not in s.decoding.eos:
            s.stopped = s.decoding.stop_at(self.tok.decode(s.tokens)) is not None

    def _done(self, session: Session) -> bool:
        return session.tokens[-1] in session.decoding.eos or session.stopped \
            or len(session.tokens) >= session.decoding.max_new_tokens or int(session.mask.sum()) >= self.max_context

    def _ids(self, session: Session) -> list[int]:
        return [t for t in session.tokens if t not in session.decoding.eos]

    def _answer(self, frame: Frame, session: Session) -> Frame:
        ids = self._ids(session)
        text = self.tok.decode(ids)
        cut = session.decoding.stop_at(text) if session.decoding.stop else None
        body = {"text": text if cut is None else text[:cut], "tokens": len(ids), "token_ids": ids}
        if session.decoding.capped:
            body["capped"] = session.decoding.max_new_tokens
        if session.image_cached:
            body.update(image_cached=session.image_cached, image_ttl_s=self.images.ttl_s)
            if self.server_id:
                body["server"] = self.server_id
        return json_frame(FrameKind.ANSWER, body, **frame.reply_fields())

    def _stream(self, s: Session) -> None:
        """Send the tokens made since the last TOKENS frame, every `stream` of them."""
        ids = self._ids(s)
        if self.emit is None or not s.decoding.stream or len(ids) - s.streamed < s.decoding.stream:
            return
        try:
            self.emit(s.frame, tokens_frame(s.streamed, ids[s.streamed:], **s.frame.reply_fields()))
        except Exception:  # noqa: BLE001 - a lost partial costs nothing: the ANSWER has every token
            log.exception("could not stream tokens to %s", s.frame.device_id)
        s.streamed = len(ids)

    def _prefill(self, group: list[tuple]) -> list[Frame]:
        frames, wires, masks = [g[1] for g in group], [g[2] for g in group], [g[5] for g in group]
        lengths = [w.shape[1] for w in wires]
        t_max = max(lengths)
        # Left padding: positions come from the mask, so a padded prompt sees what it would alone.
        wire = torch.cat([torch.nn.functional.pad(w, (0, 0, t_max - n, 0)) for w, n in zip(wires, lengths)])
        mask = torch.cat([torch.nn.functional.pad(m, (t_max - n, 0)) for m, n in zip(masks, lengths)])
        cache = KVCache()
        logits = self._logits(wire, mask, cache)
        deadline = time.time() + self.session_timeout
        sessions = [Session(None, g[5], [], 1, deadline, decoding=g[3], frame=g[1], image_cached=g[4])
                    for g in group]
        for row, s in enumerate(sessions):
            self._add(s, logits[row])
        if self.split.cut == 0:  # the server holds the token encoder: generate to the end, all rows at once
            while not all(self._done(s) for s in sessions):
                for s in sessions:
                    if not self._done(s):
                        self._stream(s)
                last = torch.tensor([[s.tokens[-1]] for s in sessions], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(sessions), 1)], dim=1)
                logits = self._logits(self._encode_tokens(last), mask, cache)
                for row, s in enumerate(sessions):
                    s.mask = torch.cat([s.mask, s.mask.new_ones(1, 1)], dim=1)
                    if not self._done(s):
                        self._add(s, logits[row])
                        s.step += 1
            return [self._answer(f, s) for f, s in zip(frames, sessions)]
        replies = []
        for row, (f, s) in enumerate(zip(frames, sessions)):
            if self._done(s):
                replies.append(self._answer(f, s))
                continue
            s.cache = KVCache({i: (k[row:row + 1, :, t_max - lengths[row]:], v[row:row + 1, :, t_max - lengths[row]:])
                               for i, (k, v) in cache.kv.items()})
            with self._lock:
                self._expire()
                self.sessions[(f.device_id, f.request_id)] = s
            replies.append(self._next(f, s))
        return replies

    def _decode(self, group: list[tuple]) -> list[Frame]:
        frames, wires, sessions = [g[1] for g in group], [g[2] for g in group], [g[3] for g in group]
        if len(sessions) == 1:
            s = sessions[0]
            s.mask = torch.cat([s.mask, s.mask.new_ones(1, 1)], dim=1)
            logits = self._logits(wires[0], s.mask, s.cache)
        else:
            lengths = [s.mask.shape[1] for s in sessions]
            l_max = max(lengths)
            mask = torch.cat([torch.nn.functional.pad(s.mask, (l_max - n, 1), value=0) for s, n in zip(sessions, lengths)])
            mask[:, -1] = 1
            pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, l_max - n, 0))  # noqa: E731
            cache = KVCache({i: (torch.cat([pad(s.cache.kv[i][0], n) for s, n in zip(sessions, lengths)]),
                                 torch.cat([pad(s.cache.kv[i][1], n) for s, n in zip(sessions, lengths)]))
                             for i in sessions[0].cache.kv})
            logits = self._logits(torch.cat(wires), mask, cache)
            for row, (s, n) in enumerate(zip(sessions, lengths)):
                s.cache = KVCache({i: (k[row:row + 1, :, l_max - n:], v[row:row + 1, :, l_max - n:])
                                   for i, (k, v) in cache.kv.items()})
                s.mask = torch.cat([s.mask, s.mask.new_ones(1, 1)], dim=1)
        replies = []
        for row, (f, s) in enumerate(zip(frames, sessions)):
            self._add(s, logits[row])
            s.step += 1
            s.deadline = time.time() + self.session_timeout
            if self._done(s):
                with self._lock:
                    self.sessions.pop((f.device_id, f.request_id), None)
                replies.append(self._answer(f, s))
            else:
                replies.append(self._next(f, s))
        return replies

    def _next(self, frame: Frame, session: Session) -> Frame:
        body = {"token_id": session.tokens[-1], "step": session.step}
        if self.server_id:
            body["server"] = self.server_id
        return json_frame(FrameKind.NEXT_TOKEN, body, **frame.reply_fields())

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.deadline < now]:
            del self.sessions[key]
