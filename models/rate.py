"""`edgeqtl calibrate`: the number of levels chosen from measured rate and distortion.

The client half runs on N samples, and the quantizer's input is collected: in_proj's
output at every position that goes up as codes. With prompt ids at cut 0 these are the
image positions only. For each level count L, the quantizer is applied as the encoder
would apply it: per-token normalisation, clipping at L's own clip range, and rounding.
Then these are measured:

    distortion   MSE between the per-token standardised signal and its quantized value,
                 over the signal's power, after the best gain per dimension (the server's
                 out_proj learns the scale: no scale travels); and the mean cosine
                 between the two, per token
    entropy      the codes' empirical entropy per element, per dimension then averaged;
                 and their cross-entropy under the fitted model, the rate an ideal coder
                 with that model would reach (what rANS is checked against)
    rANS         the bytes that the real coder (edgeqtl.codec, the per-dimension model
                 fitted on the first half of the samples) produces for the second half:
                 one payload in all (the coder's rate), and per question as frames,
                 headers included, falling back to packing where that is smaller, as
                 the device does (the wire's rate)
    bound        the Gaussian rate-distortion bound D(R) = sigma^2 2^(-2R) at that rate,
                 for comparison: no quantizer of a Gaussian source at R bits does better
                 (a source that is not Gaussian, or whose elements are not independent,
                 can fall below it: the Gaussian is the hardest source of its variance)

Requantizing a quantizer trained at one L measures what each L would give before the
quantizer is retrained for it. The pick is then checked by training at it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .quantizer import EPS, default_clip_sigmas

LEVELS = tuple(range(2, 17))


@dataclasses.dataclass
class LevelRow:
    levels: int
    clip_sigmas: float
    distortion: float  # relative MSE
    cosine: float
    entropy_bits: float  # empirical, per element
    model_bits: float  # cross-entropy under the fitted entropy model, per element
    rans_payload_bits: float  # the coder on the held-out half as one payload, per element
    wire_bits: float  # per element as sent: frames per question, headers included
    packed_bits: float  # log2(L) packing, per element, headers included
    bound_distortion: float  # Gaussian D(R) at R = wire_bits


@dataclasses.dataclass
class Calibration:
    rows: list[LevelRow]
    samples: int
    elements: int  # code elements measured (positions x code_dim)
    code_dim: int
    trained_levels: int | None
    recommended: int
    target_bits: float | None
    target_distortion: float | None

    def row(self, levels: int) -> LevelRow:
        return next(r for r in self.rows if r.levels == levels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.inference_mode()
def quantizer_inputs(model, inputs, prompt_ids: bool) -> tuple[np.ndarray, list[int]]:
    """(in_proj's output (positions, code_dim) at the positions that go up as codes, how
    many of them each question sends)."""
    from .split import kept_rows

    client = model.client
    ids, mask = torch.from_numpy(inputs.input_ids), torch.from_numpy(inputs.attention_mask)
    h, e = client.through_layers(ids, mask, torch.from_numpy(inputs.pixel_values))
    z = client.encoder.in_proj(h)
    ids, sent = kept_rows(ids, e.rows), kept_rows(mask, e.rows).bool()  # FastV sends K of the image rows
    if prompt_ids:
        sent &= ids == client.image_token_id
    return z[sent].float().numpy(), sent.sum(1).tolist()


def _standardise(z: np.ndarray) -> np.ndarray:
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + EPS)


def quantize(s: np.ndarray, levels: int, clip_sigmas: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes, their values in sigma units) of standardised values, as the encoder does."""
    n = np.clip(s / clip_sigmas, -1.0, 1.0)
    codes = np.round((n + 1.0) * (0.5 * (levels - 1))).astype(np.uint8)
    return codes, (codes.astype(np.float32) * (2.0 / (levels - 1)) - 1.0) * clip_sigmas


def empirical_entropy(codes: np.ndarray, levels: int) -> float:
    """Bits per element: each dimension's entropy, averaged over the dimensions."""
    total = 0.0
    for d in range(codes.shape[1]):
        p = np.bincount(codes[:, d], minlength=levels) / len(codes)
        p = p[p > 0]
        total += float(-(p * np.log2(p)).sum())
    return total / codes.shape[1]


def measure_level(s: np.ndarray, questions: list[int], levels: int, clip_sigmas: float | None = None,
                  header_bytes: int = 75) -> LevelRow:
    """One row: s is (positions, code_dim) standardised; questions[i] is how many
    positions question i sends (in order). The entropy model is fitted on the first
    half of the questions and measured on the rest."""
    from edgeqtl.codec import EntropyModel, encode_codes_entropy, packed_nbytes

    c = clip_sigmas if clip_sigmas is not None else default_clip_sigmas(levels)
    codes, values = quantize(s, levels, c)
    gain = (s * values).sum(0) / np.maximum((values * values).sum(0), EPS)  # per dimension, as out_proj can learn
    distortion = float(((s - gain * values) ** 2).mean() / (s ** 2).mean())
    cos = (s * values).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(values, axis=-1) + EPS)
    edges = np.cumsum([0, *questions])
    half = max(1, len(questions) // 2)
    fit, held = codes[:edges[half]], codes[edges[half]:]
    if not len(held):
        raise ValueError("calibration needs at least 2 questions: the entropy model is fitted on one half")
    dim = codes.shape[1]
    counts = np.ones((dim, levels), np.int64) + np.stack([np.bincount(fit[:, d], minlength=levels) for d in range(dim)])
    model = EntropyModel(counts)
    probs = counts / counts.sum(1, keepdims=True)
    model_bits = float(-np.log2(probs[np.arange(dim), held]).mean())
    payload = len(encode_codes_entropy(held[None], levels, model))
    wire = packed = 0
    for a, b in zip(edges[half:-1], edges[half + 1:]):
        q = codes[a:b][None]
        p = packed_nbytes(q.size, levels)
        wire += header_bytes + min(p, len(encode_codes_entropy(q, levels, model)))
        packed += header_bytes + p
    n = held.size
    wire_bits = 8 * wire / n
    return LevelRow(levels, c, distortion, float(cos.mean()), empirical_entropy(held, levels), model_bits,
                    8 * payload / n, wire_bits, 8 * packed / n, 2.0 ** (-2 * wire_bits))


def recommend(rows: list[LevelRow], target_bits: float | None, target_distortion: float | None) -> int:
    """For a rate: the least distortion within it. For a distortion: the fewest bits
    that reach it. Neither reachable: the nearest row (fewest bits, or least distortion)."""
    if target_distortion is not None:
        ok = [r for r in rows if r.distortion <= target_distortion]
        return min(ok, key=lambda r: r.wire_bits).levels if ok else min(rows, key=lambda r: r.distortion).levels
    target = 2.0 if target_bits is None else target_bits
    ok = [r for r in rows if r.wire_bits <= target]
    return min(ok, key=lambda r: r.distortion).levels if ok else min(rows, key=lambda r: r.wire_bits).levels


def calibrate(model, samples, prompts, image, batch_size: int, prompt_ids: bool, levels=LEVELS,
              clip_sigmas: float | None = None, target_bits: float | None = None,
              target_distortion: float | None = None, progress=None) -> Calibration:
    from edgeqtl.export.calibration import batches

    if model.split.quantizer != "fsq":
        raise ValueError("calibrate measures a learned quantizer's input; this model has none (a 16-bit split)")
    chunks, questions = [], []
    for inputs in batches(samples, prompts, image, batch_size):
        z, sent = quantizer_inputs(model, inputs, prompt_ids)
        chunks.append(z)
        questions += sent
        if progress is not None:
            progress(len(inputs.answers))
    s = _standardise(np.concatenate(chunks))
    rows = [measure_level(s, questions, lv, clip_sigmas) for lv in levels]
    return Calibration(rows, len(samples), int(s.size), int(s.shape[1]),
                       model.split.levels, recommend(rows, target_bits, target_distortion), target_bits,
                       target_distortion)


def plot(cal: Calibration, path) -> None:
    """Rate (bits per element on the wire) against distortion, with the Gaussian bound."""
    from edgeqtl.bench.report import new_figure, save_figure

    fig, ax = new_figure()
    r = np.linspace(0.05, max(x.wire_bits for x in cal.rows) * 1.05, 200)
    ax.plot(r, 2.0 ** (-2 * r), "--", color="grey", label="Gaussian bound D(R) = 2^(-2R)")
    ax.plot([x.wire_bits for x in cal.rows], [x.distortion for x in cal.rows], "o-", label="measured (rANS, headers)")
    ax.plot([x.entropy_bits for x in cal.rows], [x.distortion for x in cal.rows], ".:", alpha=0.6,
            label="empirical entropy")
    for x in cal.rows:
        ax.annotate(str(x.levels), (x.wire_bits, x.distortion), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pick = cal.row(cal.recommended)
    ax.plot([pick.wire_bits], [pick.distortion], "*", markersize=16, color="red",
            label=f"recommended: L = {pick.levels}")
    ax.set_xlabel("bits per element on the wire")
    ax.set_ylabel("relative MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"rate and distortion per level count ({cal.samples} samples)")
    save_figure(fig, path)



# --------------------------------------------------------------------------- bytes per question against K

TOKEN_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625)
# Besides the payload a device's frame carries its ids and its device id (8 characters
# here; MQTT 5 carries the reply topic as a property, outside the frame).
FRAME_FIELDS = dict(request_id=bytes(16), fingerprint=bytes(16), device_id="device-0")


@dataclasses.dataclass
class TokenBytesRow:
    reducer: str  # "none": every image token
    tokens: int  # image tokens kept per image (K)
    positions: float  # code positions per question, mean
    packed: float  # bytes of one question's INFER_REQUEST, log2(L)-bit packing, headers included
    rans: float  # the same, entropy-coded where that is smaller (as the device sends)
    fp16: float  # the same prompt as 16-bit hidden states with every image token, one frame
    note: str = ""  # why a row has no figures (a reducer that cannot keep this K)


def fit_image_entropy(model, samples, prompts, image, batch_size: int, prompt_ids: bool):
    """The entropy model export fits: on every image token (the reducer off), so that one
    server half serves every K; with prompt ids, on the image positions alone."""
    from edgeqtl.export.calibration import fit_entropy_model

    from .reduce import all_image_tokens

    with all_image_tokens(model, prompts) as every:
        return fit_entropy_model(model, samples, every, image, batch_size, image_only=prompt_ids)


@torch.inference_mode()
def question_bytes(model, samples, prompts, image, prompt_ids: bool, entropy) -> TokenBytesRow:
    """Mean size of one question's INFER_REQUEST, built and encoded by edgeqtl.wire as the
    device builds it, over `samples` (one frame each: the image's codes and its
    reference, as a first question about it goes)."""
    from edgeqtl import wire
    from edgeqtl.export.calibration import batches

    levels, every = model.split.levels, model.family.num_image_tokens(model.hf.config)
    packed, rans, fp16, positions = [], [], [], []
    for inputs in batches(samples, prompts, image, 1):
        out = model.client(torch.from_numpy(inputs.input_ids), torch.from_numpy(inputs.attention_mask),
                           torch.from_numpy(inputs.pixel_values))
        codes, ids = out.wire.numpy(), inputs.input_ids[0]
        sent = ids if out.rows is None else ids[out.rows[0].numpy()]  # FastV sends K of the prompt's image rows
        where = np.flatnonzero(sent == prompts.image_token_id)
        if prompt_ids:
            codes = codes[:, where]
        codes = np.ascontiguousarray(codes)
        # the image's digest (and, where it keeps original positions, its kept positions) go
        # with it, as a device that reuses images (the default) sends its first question
        image_codes = codes[0] if prompt_ids else codes[0, where[0]:where[-1] + 1]
        placed = {} if out.image_positions is None else {
            "span": model.client.reducer.span, "kept": tuple(int(i) for i in out.image_positions[0])}
        options = wire.InferOptions(image=wire.ImageRef(int(where[0]), len(where), wire.image_digest(image_codes),
                                                        **placed))
        for sizes, ent in ((packed, None), (rans, entropy)):
            frame = wire.infer_request_frame(wire.codes_part(codes, levels, ent), options,
                                             ids if prompt_ids else None, **FRAME_FIELDS)
            sizes.append(len(wire.encode_frame(frame)))
        hidden = np.zeros((1, len(ids) - model.num_image_tokens + every, model.hidden_size), np.float16)
        fp16.append(len(wire.encode_frame(wire.array_frame(wire.FrameKind.INFER_REQUEST, hidden, **FRAME_FIELDS))))
        positions.append(codes.shape[1])
    spec = model.image_reduction
    return TokenBytesRow(spec.reducer if spec else "none", model.sent_image_tokens, float(np.mean(positions)),
                         float(np.mean(packed)), float(np.mean(rans)), float(np.mean(fp16)))


def bytes_against_tokens(model, fit, held, prompts, image, prompt_ids: bool, reducer: str = "divprune",
                         fractions=TOKEN_FRACTIONS, batch_size: int = 16) -> list[TokenBytesRow]:
    """Bytes per question for K = each fraction of the image's tokens (`reducer` choosing,
    the trained quantizer unchanged): the entropy model is fitted once on `fit`, the
    frames measured on `held`."""
    from .families.base import UnsupportedModelError
    from .reduce import ImageReduction, reduction_set

    if model.split.quantizer != "fsq":
        raise ValueError("bytes against K measure codes; this model has no quantizer (a 16-bit split)")
    entropy = fit_image_entropy(model, fit, prompts, image, batch_size, prompt_ids)
    every = model.family.num_image_tokens(model.hf.config) - model.family.trailing_tokens
    rows, seen = [], set()
    for frac in fractions:
        k = min(every, max(1, round(frac * every)))
        if k in seen:  # a few image tokens: several fractions round to one K
            continue
        seen.add(k)
        try:
            spec = None if k >= every else ImageReduction(reducer, k)
            with reduction_set(model, prompts, spec) as reduced:
                rows.append(question_bytes(model, held, reduced, image, prompt_ids, entropy))
        except UnsupportedModelError as e:
            rows.append(TokenBytesRow(reducer, k, 0, 0, 0, 0, note=str(e).split(";")[0]))
    return rows
