"""Visual token reduction on the device: K of an image's N tokens go on, after the
connector and before the cut layers and the quantizer, so the uplink, the device's own
layers and the server's prefill all shrink by N / K.

    ImageReduction("divprune", 64)   max-min diversity over the features (DivPrune)
    ImageReduction("attention", 64)  the tokens the tower's last layer attends to most, plus
                                     a few contextual tokens merged from the rest (VisionZip)
    ImageReduction("pool", 64)       average pooling over the patch grid (8 x 8 of 27 x 27)
    ImageReduction("random", 64)     a seeded choice: the control
    ImageReduction("fastv", 64)      at cut >= 1: every token goes through the device's
                                     layers, then the K image tokens the prompt's last token
                                     attends to most in the last of them go on (FastV)

Kept tokens stay in their original order (pooling keeps the grid's). Positions follow
one of two conventions (ImageReduction.positions):

- `original` (the default): each kept token keeps the position it had among all N, and
  the text after the image keeps its own, as if the dropped tokens were still there
  but masked. A model trained with every token reads the same layout: measured on a
  trained fixture with half its tokens kept, 90.6% against 60.8% (docs/MODELS.md). The
  device sends the kept positions with the image (wire.ImageRef: a bit map of N bits),
  and both halves carry them as position steps in the attention mask
  (split.position_mask). A pooled token takes the position of its cell's centre; a
  VisionZip contextual token that of the token its group formed around.
- `consecutive`: the prompt simply holds K image tokens, at consecutive positions (the
  convention of VisionZip and DivPrune in LLaVA). Bundles exported before the field
  have it.

The tower reducers (all but fastv) run before the device's layers, so those layers see
K tokens; fastv runs after them (TokenReducer.at_cut), so the device's layers, and its
KV cache, keep all N while the wire and the server's trunk take K. Its positions are
always original: the device's layers saw each token at its own.

Every reducer exports to ONNX with a dynamic batch (export/graphs.py) and is covered by
export's ONNX-against-PyTorch check.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .families.base import UnsupportedModelError
from .split import position_ids_from_mask

REDUCERS = ("divprune", "attention", "pool", "random", "fastv")
POSITIONS = ("original", "consecutive")
CONTEXT_FRACTION = 0.125  # VisionZip's share of contextual (merged) tokens: 8 of 64


@dataclasses.dataclass(frozen=True)
class ImageReduction:
    reducer: str
    tokens: int  # K, the image tokens kept per image
    seed: int = 0  # `random` only
    positions: str = "original"  # the kept tokens' positions: see the module's docstring

    def __post_init__(self):
        if self.reducer not in REDUCERS:
            raise UnsupportedModelError(f"--reducer must be one of {', '.join(REDUCERS)}, got {self.reducer!r}")
        if self.positions not in POSITIONS:
            raise UnsupportedModelError(f"image token positions must be one of {', '.join(POSITIONS)}, "
                                        f"got {self.positions!r}")
        if self.tokens < 1:
            raise UnsupportedModelError(f"--image-tokens must be at least 1, got {self.tokens}")
        if self.at_cut and self.positions != "original":
            raise UnsupportedModelError("--reducer fastv keeps the original positions: the device's layers saw "
                                        "every token at its own")

    @property
    def at_cut(self) -> bool:
        """Whether the choice is made after the device's layers (FastV), not before them."""
        return self.reducer == "fastv"

    @property
    def int8_safe(self) -> bool:
        """Whether an int8 tower keeps the reducer's choice well enough to verify. Choices
        made from the features flip under int8 rounding: DivPrune's agreed on 77.5% of the
        codes of a random-weight OneVision (85% needed), the attention ranking on 94.4% at
        K = 64 but 84.5% at K = 16; pool and random do not depend on the values (99.0%, 98.6%)."""
        return self.reducer in ("pool", "random")  # fastv ranks by attention: as `attention` does

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ImageReduction | None":
        """Saved before `positions` existed: consecutive, as those models and bundles ran."""
        if not d:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"positions": "consecutive", **{k: v for k, v in d.items() if k in fields}})

    @classmethod
    def parse(cls, tokens: str | float | int | None, reducer: str | None, full: int) -> "ImageReduction | None":
        """--image-tokens K (a count, or a fraction such as 0.125 of the `full` count) and
        --reducer; None when neither asks for a reduction."""
        if tokens is None:
            if reducer is not None:
                raise UnsupportedModelError("--reducer needs --image-tokens K (a count, or a fraction such as 0.125)")
            return None
        value = float(tokens)
        k = int(round(value * full)) if 0 < value < 1 else int(value)
        if value != int(value) and not 0 < value < 1:
            raise UnsupportedModelError(f"--image-tokens takes a count or a fraction in (0, 1), got {tokens}")
        if not 1 <= k <= full:
            raise UnsupportedModelError(f"--image-tokens {tokens} gives {k} of the image's {full} tokens; "
                                        f"ask for 1 to {full}")
        return cls(reducer or "divprune", k)


def reduce_image_tokens(model, tokens, reducer: str | None) -> None:
    """--image-tokens / --reducer applied to a SplitModel (nothing when neither is given)."""
    if tokens is None and reducer is None:
        return
    full = model.family.num_image_tokens(model.hf.config) - model.family.trailing_tokens
    model.set_image_reduction(ImageReduction.parse(tokens, reducer, full))


def reduction_entry(model) -> dict | None:
    """The bundle manifest's image_reduction: the spec, and the positions one image takes
    (`span`: what the device sends with the kept positions, wire.ImageRef)."""
    spec = model.image_reduction
    return None if spec is None else {**spec.to_dict(), "span": model.client.reducer.span}


@contextlib.contextmanager
def reduction_set(model, prompts, spec: "ImageReduction | None"):
    """The model keeping K of each image's tokens as `spec` says (None: all of them), and a
    prompt encoder with that many image tokens, for a while; then as they were."""
    before = model.image_reduction
    if spec == before:
        yield prompts
        return
    changed = copy.copy(prompts)
    model.set_image_reduction(spec)
    changed.image_token_count = model.num_image_tokens
    try:
        yield changed
    finally:
        model.set_image_reduction(before)


def all_image_tokens(model, prompts):
    """The model and a prompt encoder without the token reducer, for a while: export fits
    the entropy model on every image token, so that bundles of one model with different K
    share it (and the server half that holds it serves them all)."""
    return reduction_set(model, prompts, None)


class TokenReducer(nn.Module):
    """(B, N + T, H) image features -> ((B, K + T, H) features, (B, K + T) positions: each
    kept token's position among the N + T, ascending; None under `consecutive`). `grid`:
    the side of the patch grid when the N tokens form one (pooling needs it); `trailing`:
    T tokens the family always appends, kept as they are (LLaVA-OneVision's newline)."""

    def __init__(self, spec: ImageReduction, full: int, grid: int | None, trailing: int = 0,
                 tower_attention: bool = True):
        super().__init__()
        self.spec, self.full, self.grid, self.trailing = spec, full, grid, trailing
        self.span = full + trailing  # the positions an image takes, under either convention
        self.k, n = spec.tokens, full
        if not self.k <= n:
            raise UnsupportedModelError(f"--image-tokens {self.k}: the image has {n} tokens")
        if spec.reducer == "attention" and not tower_attention:
            raise UnsupportedModelError("--reducer attention ranks the tower's own tokens by the attention they "
                                        "receive; this family's connector merges them first (use divprune, pool "
                                        "or random)")
        if spec.reducer == "pool":
            side = math.isqrt(self.k)
            if grid is None or side * side != self.k:
                raise UnsupportedModelError(
                    "--reducer pool needs a square --image-tokens (16, 64, 144, ...) and image tokens that form a "
                    "grid" + ("" if grid else " (this model's do not: its tower adds or drops a token)"))
            self.side = side
        if spec.reducer == "random":
            g = torch.Generator().manual_seed(spec.seed)
            keep = torch.randperm(n, generator=g)[: self.k].sort().values
            self.register_buffer("keep", keep, persistent=False)

    def forward(self, feats: torch.Tensor, attention: torch.Tensor | None = None):
        if self.spec.at_cut:
            raise RuntimeError("fastv chooses at the cut (TokenReducer.at_cut), not from the image's features")
        tail = feats[:, feats.shape[1] - self.trailing:] if self.trailing else None
        x = feats[:, : feats.shape[1] - self.trailing] if self.trailing else feats
        b, reducer, original = x.shape[0], self.spec.reducer, self.spec.positions == "original"
        if reducer == "random":
            keep = self.keep.unsqueeze(0).expand(b, -1)
            out = x[:, self.keep]
        elif reducer == "pool":
            grid = x.transpose(1, 2).reshape(b, x.shape[2], self.grid, self.grid)
            out = F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)
            keep = pool_centres(self.grid, self.side, x.device).unsqueeze(0).expand(b, -1)
        elif reducer == "divprune":
            keep = divprune(x, self.k)
            out = _gather(x, keep)
        else:
            if attention is None:
                raise UnsupportedModelError("--reducer attention needs the tower's attention; this family's "
                                            "image tokens are not the tower's (use divprune, pool or random)")
            out, keep = visionzip(x, attention, self.k, in_order=original)
        if tail is not None:
            out = torch.cat([out, tail], dim=1)
            keep = torch.cat([keep, torch.arange(self.full, self.span, device=x.device).unsqueeze(0).expand(b, -1)], 1)
        return out, (keep if original else None)

    def at_cut(self, is_image: torch.Tensor, received: torch.Tensor):
        """FastV after the device's layers. is_image (B, T): one image of N (+ trailing)
        tokens per row; received (B, T): the attention the prompt's last position paid
        each token in the last of those layers. -> (the kept rows (B, T - N + K) of the sequence, ascending; the kept
        image tokens' positions within the image (B, K + trailing)). The trailing tokens
        (OneVision's newline) always stay."""
        t = is_image.shape[1]
        rank = is_image.long().cumsum(-1) - 1
        prunable = is_image & (rank < self.full)
        if not (torch.compiler.is_exporting() or torch.compiler.is_compiling()) and \
                not bool((prunable.sum(1) == self.full).all()):
            raise UnsupportedModelError(f"--reducer fastv needs one image of {self.full} tokens in every row; a row "
                                        "has another count (a text-only question, or several images)")
        chosen = received.float().masked_fill(~prunable, float("-inf")).topk(self.k, dim=-1).indices.sort(dim=1).values
        keep = (~prunable).scatter(1, chosen, True)
        # kept rows first, each group in order: distinct keys, so no sort stability is needed
        key = (~keep).long() * t + torch.arange(t, device=keep.device)
        rows = key.argsort(dim=1)[:, : t - (self.full - self.k)]
        positions = chosen - is_image.long().argmax(-1, keepdim=True)
        if self.trailing:
            tail = torch.arange(self.full, self.span, device=keep.device).unsqueeze(0).expand(len(rows), -1)
            positions = torch.cat([positions, tail], dim=1)
        return rows, positions


def pool_centres(grid: int, side: int, device=None) -> torch.Tensor:
    """(side * side,) the position among a grid x grid raster of each pooled cell's centre
    (adaptive pooling's cells, rounded down): ascending, one per cell."""
    centre = ((torch.arange(side, device=device) * 2 + 1) * grid) // (2 * side)
    return (centre.unsqueeze(1) * grid + centre.unsqueeze(0)).flatten()


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K) indices, ascending, of a max-min diverse subset under cosine distance:
    the first token is the one farthest from its nearest neighbour; each next one is the
    token farthest from those chosen (greedy max-min, as DivPrune solves it)."""
    u = F.normalize(x.float(), dim=-1)
    dist = 1 - u @ u.transpose(1, 2)  # (B, N, N)
    n = x.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).amin(-1).argmax(-1)  # (B,)
    chosen = [first]
    nearest = torch.gather(dist, 1, first.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)  # (B, N): to the chosen set
    for _ in range(k - 1):
        nxt = nearest.argmax(-1)
        chosen.append(nxt)
        d = torch.gather(dist, 1, nxt.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
        nearest = torch.minimum(nearest, d)
    return torch.stack(chosen, dim=1).sort(dim=1).values


def visionzip(x: torch.Tensor, attention: torch.Tensor, k: int, in_order: bool = False):
    """VisionZip for a tower without a class token: the K - C tokens that receive the most
    attention (mean over heads and queries of the tower's last layer) stay, in order;
    the rest are merged into C contextual tokens, each the mean of the remaining tokens
    most similar to one of C evenly spaced targets among them. -> (features (B, K, H),
    positions (B, K)): a contextual token's is its target's. in_order: the K sorted by
    position (the original-positions convention); else the contextual tokens come last."""
    b, n, h = x.shape
    contextual = min(max(1, int(k * CONTEXT_FRACTION)), k - 1) if k > 1 else 0
    dominant = k - contextual
    received = attention.float().mean(dim=1).mean(dim=1)  # (B, N): attention each token receives
    order = received.argsort(dim=-1, descending=True)
    keep = order[:, :dominant].sort(dim=1).values
    out = _gather(x, keep)
    if not contextual:
        return out, keep
    rest_idx = order[:, dominant:].sort(dim=1).values  # the others, in order
    rest = _gather(x, rest_idx)  # (B, R, H)
    r = n - dominant
    step = r // contextual
    target_at = torch.arange(contextual, device=x.device) * step
    targets = rest[:, target_at]  # (B, C, H)
    sim = F.normalize(rest.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).transpose(1, 2)  # (B, R, C)
    assign = F.one_hot(sim.argmax(-1), contextual).to(x.dtype)  # (B, R, C)
    merged = assign.transpose(1, 2) @ rest / assign.sum(1).clamp(min=1).unsqueeze(-1)
    out, positions = torch.cat([out, merged], dim=1), torch.cat([keep, rest_idx[:, target_at]], dim=1)
    if not in_order:
        return out, positions
    positions, order = positions.sort(dim=1)
    return _gather(out, order), positions


# --------------------------------------------------------------------------- FastV's ranking


def fastv_ranks_with(decoder, layer) -> None:
    """Refuses, in one line, a decoder layer whose attention last_token_attention does
    not compute exactly: no q_proj/k_proj, partial rotary, other norms, logit softcapping."""
    attn, cfg = getattr(layer, "self_attn", None), decoder.config
    plain = (all(hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim")) and hasattr(layer, "input_layernorm")
             and getattr(cfg, "partial_rotary_factor", 1.0) in (None, 1.0) and not hasattr(attn, "q_layernorm")
             and not getattr(cfg, "attn_logit_softcapping", None) and not hasattr(attn, "rotary_ndims"))
    if not plain:
        raise UnsupportedModelError(f"--reducer fastv ranks by the attention of {type(layer).__name__}, whose "
                                    "attention it does not compute exactly (partial rotary, other norms or "
                                    "softcapping); use a tower reducer (divprune, attention, pool, random)")


@torch.no_grad()  # it only ranks (a top-K): no graph to keep in training
def last_token_attention(decoder, layer, h: torch.Tensor, attention_mask: torch.Tensor,
                         query: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T): the attention the prompt's last position pays each token in `layer` (mean
    over its heads), from the layer's input h: FastV's ranking. query (B,): that position
    in each row, where an answer follows the prompt (training; keys after it are
    masked); None: the last one, as at inference. Computed from the layer's own
    projections and rotary embedding, since the fused attention kernels return no weights
    (a test checks it against eager attention's)."""
    attn = layer.self_attn  # fastv_ranks_with checked it when the reducer was set
    x = layer.input_layernorm(h)
    b, t, _ = x.shape
    d = attn.head_dim
    at = torch.full((b,), t - 1, dtype=torch.long, device=h.device) if query is None else query
    pick = lambda y: torch.gather(y, 1, at.view(b, 1, 1).expand(-1, 1, y.shape[-1]))  # noqa: E731
    q = attn.q_proj(pick(x)).view(b, 1, -1, d)
    k = attn.k_proj(x).view(b, t, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = decoder.rotary_emb(h, position_ids_from_mask(attention_mask, t))
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q = rotate(q, q, pick(cos), pick(sin))[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * getattr(attn, "scaling", d ** -0.5)  # (B, heads, T)
    seen = attention_mask.bool() & (torch.arange(t, device=h.device).unsqueeze(0) <= at.unsqueeze(1))
    scores = scores.masked_fill(~seen.unsqueeze(1), float("-inf"))
    return scores.softmax(-1).mean(1)


def prompt_ends(labels: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) each row's last prompt position, before its first label (rows without one:
    the last position); None without labels."""
    if labels is None:
        return None
    answer = labels != -100
    first = torch.where(answer.any(1), answer.long().argmax(1), labels.shape[1])
    return first - 1
