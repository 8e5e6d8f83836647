"""A VLM (any family of models/families) split at decoder layer `cut` into a ClientHalf and a ServerHalf.

    ClientHalf (device): vision tower -> projector -> spliced into token embeddings
                         -> decoder layers [0, cut) -> quantizer encoder -> codes
    ServerHalf (server): codes -> quantizer decoder -> decoder layers [cut, N)
                         -> final norm -> lm_head -> logits

Both halves drive Hugging Face decoder layers one by one with an explicit additive
attention mask, position ids derived from the attention mask, and rotary embeddings
computed by each half from the same config, so nothing but the wire tensor and the
attention mask has to cross the cut. With the quantizer set to "identity", client
then server reproduces the unsplit model's logits.

Wire modes (`SplitConfig.quantizer`):
    fsq       uint8 codes (B, T, code_dim) in [0, levels)   - what edgeqtl sends
    fp16      float16 hidden states (B, T, hidden)          - the 16-bit baseline
    identity  float32 hidden states (B, T, hidden)          - exactness tests only
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from .families import family_of
from .families.base import UnsupportedModelError, VLMParts
from .quantizer import QuantizerDecoder, QuantizerEncoder, dequantise

WIRE_MODES = ("fsq", "fp16", "identity")
SPLIT_CONFIG_FILE = "edgeqtl_split.json"


@dataclasses.dataclass
class SplitConfig:
    cut: int = 0
    quantizer: str = "fsq"
    levels: int = 4
    code_dim: int | None = None  # None: the LLM's hidden size
    clip_sigmas: float | None = None  # normalisation range; None: the default for `levels` (quantizer.py)
    # Cut 0 only: the prompt's text reaches the trunk as its own embeddings (the server
    # embeds the prompt ids, which go up anyway) and only the image positions are
    # quantized. What a pretrained trunk has seen; quantizer adaptation sets it.
    exact_text: bool = False

    def __post_init__(self):
        if self.quantizer not in WIRE_MODES:
            raise UnsupportedModelError(f"quantizer must be one of {WIRE_MODES}, got {self.quantizer!r}")
        if self.quantizer == "fsq" and not 2 <= self.levels <= 256:
            raise UnsupportedModelError(f"levels must be in [2, 256], got {self.levels}")
        if self.clip_sigmas is None and self.quantizer == "fsq":
            from .quantizer import default_clip_sigmas

            self.clip_sigmas = default_clip_sigmas(self.levels)
        if self.clip_sigmas is not None and not 0 < self.clip_sigmas <= 10:
            raise UnsupportedModelError(f"clip_sigmas must be in (0, 10], got {self.clip_sigmas}")
        if self.exact_text and (self.cut != 0 or self.quantizer != "fsq"):
            raise UnsupportedModelError("exact_text needs a quantized split at cut 0: at cut > 0 the text "
                                        "positions pass through the device's layers and go up as codes")

    @property
    def bits_per_symbol(self) -> float:
        import math

        return {"fsq": math.log2(self.levels), "fp16": 16.0, "identity": 32.0}[self.quantizer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SplitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if d.get("quantizer", "fsq") == "fsq":
            from .quantizer import CLIP_SIGMAS

            d.setdefault("clip_sigmas", CLIP_SIGMAS)  # saved before the field existed: 3 sigma
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- shared pieces


class KVCache:
    """Minimal key/value cache with the one method HF attention calls (`update`).

    Holds plain tensors per layer index, so it can be built from and flattened to
    explicit graph inputs/outputs (the ONNX decode-step graph).
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.kv = dict(kv or {})

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.kv:
            k0, v0 = self.kv[layer_idx]
            key, value = torch.cat([k0, key], dim=-2), torch.cat([v0, value], dim=-2)
        self.kv[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.kv.values()))[0].shape[-2] if self.kv else 0


def attention_bias(attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) 0/1 mask over past+current keys -> additive causal bias (B, 1, q_len, K)."""
    k_len = attention_mask.shape[-1]
    q_pos = torch.arange(q_len, device=attention_mask.device).unsqueeze(-1) + (k_len - q_len)
    causal = torch.arange(k_len, device=attention_mask.device).unsqueeze(0) <= q_pos
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def position_ids_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions count only attended tokens, so left padding does not shift them. Each
    mask entry is how far its token's position is past the previous one's (0: padding):
    1 everywhere but after an image whose tokens keep their original positions."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[:, -q_len:]


def position_mask(attention_mask: torch.Tensor, is_image: torch.Tensor, image_positions: torch.Tensor,
                  span: int) -> torch.Tensor:
    """The attention mask with position steps (position_ids_from_mask), for one image per
    row whose tokens sit at `image_positions` (B, K), ascending, among the `span` positions
    the whole image would take: the i-th image token steps past the previous one by the
    gap between their positions, the first token after the image past the last by what
    is left of the span, every other token by 1. Written with gathers, so that it exports
    to ONNX with dynamic shapes; the server builds the same from the frame (wire.ImageRef)."""
    k = image_positions.shape[1]
    rank = (is_image.long().cumsum(-1) - 1).clamp(min=0, max=k - 1)
    before = torch.cat([torch.full_like(image_positions[:, :1], -1), image_positions[:, :-1]], dim=1)
    image_step = torch.gather(image_positions, 1, rank) - torch.gather(before, 1, rank)
    after_image = ~is_image & torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
    rest_of_span = span - image_positions[:, -1:]
    step = torch.where(is_image, image_step, torch.where(after_image, rest_of_span, torch.ones_like(rank)))
    return step * attention_mask.long()


def kept_rows(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """x (B, T, ...) at the rows of the sequence the client sends (ClientOutput.rows: where
    FastV dropped image tokens at the cut; None: every row)."""
    if rows is None or x is None:
        return x
    idx = rows.view(*rows.shape, *[1] * (x.dim() - 2)).expand(*rows.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def sent_positions(model: SplitModel, batch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool, for a models.batches.Batch: the positions that go up as codes (at cut 0
    the image positions alone: the prompt's text goes as ids); rows: those the client
    sent (ClientOutput.rows, FastV)."""
    sent = kept_rows(batch.attention_mask, rows).bool()
    if model.split.cut == 0:
        sent = sent & (batch.input_ids == model.client.image_token_id)
    return sent


@functools.lru_cache(maxsize=None)
def cache_kwarg(layer_type: type) -> str:
    """The name a decoder layer takes its KV cache by: `cache` from transformers 5.24
    (`past_key_values` is deprecated there and goes in 5.40), `past_key_values` before."""
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_layers(decoder, layers, h, attention_mask, cache: KVCache | None = None,
               checkpointing: bool = False) -> torch.Tensor:
    """checkpointing: keep only each layer's input for backward and recompute the rest
    (a real-size trunk's activations would not fit otherwise); no KV cache then."""
    q_len = h.shape[1]
    pos = position_ids_from_mask(attention_mask, q_len)
    bias = attention_bias(attention_mask, q_len, h.dtype)
    rope = decoder.rotary_emb(h, pos)
    for layer in layers:
        kwargs = dict(attention_mask=bias, position_ids=pos, use_cache=cache is not None, position_embeddings=rope,
                      **{cache_kwarg(type(layer)): cache})
        if checkpointing and cache is None and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(lambda x, layer=layer, kw=kwargs: layer(x, **kw), h, use_reentrant=False)
        else:
            out = layer(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


# --------------------------------------------------------------------------- the halves


@dataclasses.dataclass
class ClientOutput:
    wire: torch.Tensor  # what is sent: uint8 codes, or fp16/fp32 hidden states
    values: torch.Tensor  # the float tensor the wire rounds; gradients arrive here
    # the mask the server half takes: with position steps where a reduced image keeps its
    # original positions (position_mask), else the one given
    attention_mask: torch.Tensor | None = None
    # (B, K) the kept image tokens' positions within the image (None: consecutive)
    image_positions: torch.Tensor | None = None
    # the mask the device's own layers used, which its decode steps extend (FastV: every
    # token's; else the same as attention_mask)
    device_mask: torch.Tensor | None = None
    # (B, T') the rows of the input sequence that were sent (FastV; None: all of them)
    rows: torch.Tensor | None = None


@dataclasses.dataclass
class Embedded:
    hidden: torch.Tensor  # (B, T, hidden): the token embeddings, the image's features at its positions
    attention_mask: torch.Tensor | None  # with the image's position steps (position_mask)
    image_positions: torch.Tensor | None = None  # (B, K) the kept image tokens' positions; None: consecutive
    device_mask: torch.Tensor | None = None  # the mask the device's layers use (FastV: longer than attention_mask)
    rows: torch.Tensor | None = None  # (B, T') the rows that go on (FastV)


class ClientHalf(nn.Module):
    def __init__(self, parts: VLMParts, split: SplitConfig, encoder: QuantizerEncoder | None):
        super().__init__()
        self.split = split
        self.vision_tower = parts.vision_tower
        self.projector = parts.projector
        self.embed_tokens = parts.decoder.embed_tokens
        self.layers = nn.ModuleList(parts.decoder.layers[: split.cut])
        self.encoder = encoder
        # rotary_emb holds only buffers derived from config; both halves use it.
        object.__setattr__(self, "_decoder", parts.decoder)
        self.image_token_id = parts.image_token_id
        self.feature_layer = parts.feature_layer
        self.feature_strategy = parts.feature_strategy
        self.family = parts.family
        self.reducer = None  # models/reduce.py TokenReducer: K of the image's tokens go on

    def image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((B, N, hidden) what the image positions get: the family's tower and connector,
        then the token reducer where the model has one (N is then K); (B, N) the kept
        tokens' positions within the image, or None where they are consecutive)."""
        if self.reducer is None or self.reducer.spec.at_cut:
            return self.family.image_features(self, pixel_values), None
        if self.reducer.spec.reducer == "attention":
            return self.reducer(*self.family.image_features_and_attention(self, pixel_values))
        return self.reducer(self.family.image_features(self, pixel_values))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixel_values)[0]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None) -> "Embedded":
        is_image = input_ids == self.image_token_id
        emb = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        if pixel_values is None:
            return Embedded(emb, attention_mask, device_mask=attention_mask)
        feats, positions = self.image_tokens(pixel_values)
        feats = feats.to(emb.dtype)
        # Image features go, in order, to the image-token positions (as masked_scatter
        # does), written as a gather so that it exports to ONNX with dynamic shapes.
        idx = (is_image.long().cumsum(-1) - 1).clamp(min=0, max=feats.shape[1] - 1)
        gathered = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        if positions is not None and attention_mask is not None:
            attention_mask = position_mask(attention_mask, is_image, positions, self.reducer.span)
        return Embedded(torch.where(is_image.unsqueeze(-1), gathered, emb), attention_mask, positions, attention_mask)

    def through_layers(self, input_ids, attention_mask, pixel_values=None, cache: KVCache | None = None,
                       labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Embedded]:
        """-> (hidden states at the cut, what goes with them: the mask the server half takes,
        and under FastV the device's own mask and the rows that go on). labels: where a
        batch holds answers after its prompts (training), FastV ranks from each prompt's
        last position, as it does at inference, not from the answer's."""
        e = self.embed(input_ids, pixel_values, attention_mask)
        if pixel_values is None or self.reducer is None or not self.reducer.spec.at_cut:
            return run_layers(self._decoder, self.layers, e.hidden, e.attention_mask, cache), e
        # FastV: every token through the device's layers; the last one's attention, from the
        # last position, chooses the K image tokens that go on
        from .reduce import last_token_attention, prompt_ends

        h = run_layers(self._decoder, self.layers[:-1], e.hidden, e.attention_mask, cache)
        received = last_token_attention(self._decoder, self.layers[-1], h, e.attention_mask, prompt_ends(labels))
        h = run_layers(self._decoder, self.layers[-1:], h, e.attention_mask, cache)
        is_image = input_ids == self.image_token_id
        rows, positions = self.reducer.at_cut(is_image, received)
        sent = position_mask(kept_rows(e.attention_mask, rows), kept_rows(is_image, rows), positions,
                             self.reducer.span)
        return kept_rows(h, rows), Embedded(e.hidden, sent, positions, e.attention_mask, rows)

    def hidden_and_mask(self, input_ids, attention_mask, pixel_values=None, cache: KVCache | None = None):
        """-> (hidden states at the cut, the mask the server half takes with them)."""
        h, e = self.through_layers(input_ids, attention_mask, pixel_values, cache)
        return h, e.attention_mask

    def hidden(self, input_ids, attention_mask, pixel_values=None, cache: KVCache | None = None):
        return self.hidden_and_mask(input_ids, attention_mask, pixel_values, cache)[0]

    def forward(self, input_ids, attention_mask, pixel_values=None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> ClientOutput:
        h, e = self.through_layers(input_ids, attention_mask, pixel_values, cache, labels)
        return dataclasses.replace(self.to_wire(h), attention_mask=e.attention_mask, image_positions=e.image_positions,
                                   device_mask=e.device_mask, rows=e.rows)

    def image_wire(self, pixel_values) -> ClientOutput:
        """At cut 0, what the image positions send: the projected image features, quantized
        (the text positions go as token ids, which the server embeds: prompt ids)."""
        if self.split.cut != 0:
            raise ValueError("prompt ids need cut 0: at cut > 0 the text positions pass through the device's layers")
        feats, positions = self.image_tokens(pixel_values)
        return dataclasses.replace(self.to_wire(feats), image_positions=positions)

    def tiled_image_wire(self, pixel_values, image_index) -> ClientOutput:
        """At cut 0, an image in several views (LLaVA-OneVision's any-resolution tiling):
        the views' features laid out by `image_index` (edgeqtl.tiling.anyres_index), then
        quantized: (1, P, D)."""
        if self.split.cut != 0:
            raise ValueError("tiled images need cut 0 with prompt ids")
        return self.to_wire(self.family.tile_sources(self, pixel_values)[image_index].unsqueeze(0))

    def to_wire(self, h) -> ClientOutput:
        if self.split.quantizer == "fsq":
            codes, values = self.encoder(h)
            return ClientOutput(codes, values)
        if self.split.quantizer == "fp16":
            return ClientOutput(h.to(torch.float16), h)
        return ClientOutput(h, h)


class ServerHalf(nn.Module):
    def __init__(self, parts: VLMParts, split: SplitConfig, decoder_q: QuantizerDecoder | None):
        super().__init__()
        self.split = split
        self.decoder_q = decoder_q
        self.layers = nn.ModuleList(parts.decoder.layers[split.cut:])
        self.norm = parts.decoder.norm
        self.lm_head = parts.lm_head
        object.__setattr__(self, "_decoder", parts.decoder)

    def receive(self, wire: torch.Tensor) -> torch.Tensor:
        """Wire tensor -> float values (dequantised codes, or the hidden states)."""
        if self.split.quantizer == "fsq":
            return dequantise(wire, self.split.levels, self.lm_head.weight.dtype)
        return wire.to(self.lm_head.weight.dtype)

    def forward_values(self, values, attention_mask, cache: KVCache | None = None, positions=None,
                       checkpointing: bool = False) -> torch.Tensor:
        """Logits from the wire values; positions (B, P): only at those positions (a
        real vocabulary's logits at every position are large)."""
        h = self.decoder_q(values) if self.decoder_q is not None else values
        return self.forward_hidden(h, attention_mask, cache, positions, checkpointing)

    def trunk(self, values, attention_mask) -> torch.Tensor:
        """The trunk's output hidden states (before the final norm) from the wire values:
        what label-private training returns, while the device keeps norm and lm_head."""
        h = self.decoder_q(values) if self.decoder_q is not None else values
        return run_layers(self._decoder, self.layers, h, attention_mask)

    def with_exact_text(self, decoded: torch.Tensor, exact: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """The trunk's input under `exact_text`: the decoded codes at the image positions,
        the text's own embeddings elsewhere. Without it, `decoded` everywhere."""
        if not self.split.exact_text:
            return decoded
        return torch.where(is_image.unsqueeze(-1), decoded, exact.to(decoded.dtype))

    def forward_hidden(self, h, attention_mask, cache: KVCache | None = None, positions=None,
                       checkpointing: bool = False) -> torch.Tensor:
        """Logits from hidden states at the cut, without the quantizer: with the client's
        own hidden states this is the unsplit model (the teacher of quantizer adaptation)."""
        h = run_layers(self._decoder, self.layers, h, attention_mask, cache, checkpointing)
        if positions is not None:
            h = torch.gather(h, 1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.lm_head(self.norm(h))

    def forward(self, wire, attention_mask, cache: KVCache | None = None) -> torch.Tensor:
        return self.forward_values(self.receive(wire), attention_mask, cache)

    def next_logits(self, wire, attention_mask, cache: KVCache | None = None, text_hidden=None,
                    is_image=None) -> torch.Tensor:
        """(B, V): the next token's logits only. Prompts are left-padded, so the last
        position is every row's; at a real vocabulary the logits of every position of a
        729-token prompt would take GBs. Under exact_text, text_hidden (the text's own
        embeddings) and is_image say what the text positions get instead of their codes."""
        if not self.split.exact_text:
            return self.forward_values(self.receive(wire), attention_mask, cache, last_positions(wire))[:, -1]
        h = self.with_exact_text(self.decoder_q(self.receive(wire)), text_hidden, is_image)
        return self.forward_hidden(h, attention_mask, cache, last_positions(h))[:, -1]


def last_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the last position of a (B, T, ...) batch."""
    return torch.full((x.shape[0], 1), x.shape[1] - 1, dtype=torch.long, device=x.device)


class SplitModel:
    """A transformers VLM plus its quantizer, viewed as two halves that partition its weights."""

    def __init__(self, hf_model, split: SplitConfig, untie: bool = True):
        self.hf = hf_model
        self.family = family_of(getattr(hf_model.config, "model_type", None))
        self.parts = self.family.parts(hf_model)
        n_layers = len(self.parts.decoder.layers)
        if not 0 <= split.cut < n_layers:
            raise UnsupportedModelError(f"cut must be in [0, {n_layers - 1}] for a model with {n_layers} decoder layers, got {split.cut}")
        hidden = self.parts.decoder.config.hidden_size
        if split.code_dim is None:
            split = dataclasses.replace(split, code_dim=hidden)
        self.split = split
        self.hidden_size = hidden
        self.num_layers = n_layers
        self.image_spec = None  # the checkpoint's preprocessing (models.load); None: the vision tower's size
        enc = dec = None
        if split.quantizer == "fsq":
            enc = QuantizerEncoder(hidden, split.code_dim, split.levels, split.clip_sigmas)
            dec = QuantizerDecoder(split.code_dim, hidden, split.levels)
        self.client = ClientHalf(self.parts, split, enc)
        self.server = ServerHalf(self.parts, split, dec)
        if untie and (getattr(hf_model.config, "tie_word_embeddings", False) or
                      self.parts.lm_head.weight is self.parts.decoder.embed_tokens.weight):
            # A weight tied across the cut cannot stay tied once the halves train apart.
            self.parts.lm_head.weight = nn.Parameter(self.parts.lm_head.weight.detach().clone())

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: as the family's transformers model counts them, or K
        under a token reduction."""
        if self.client.reducer is not None and not self.client.reducer.spec.at_cut:
            return self.client.reducer.spec.tokens + self.family.trailing_tokens
        return self.family.num_image_tokens(self.hf.config)  # FastV drops tokens after the prompt's layers

    @property
    def sent_image_tokens(self) -> int:
        """Image tokens per image on the wire: num_image_tokens, or K under FastV."""
        r = self.client.reducer
        return r.spec.tokens + self.family.trailing_tokens if r is not None else self.num_image_tokens

    @property
    def image_reduction(self):
        return self.client.reducer.spec if self.client.reducer is not None else None

    def set_image_reduction(self, spec) -> None:
        """Keep K of each image's tokens (models/reduce.py; OneVision's newline comes on
        top), or all of them (spec None).
        Only the device's graph changes: the server takes the count from each request."""
        from .reduce import TokenReducer, fastv_ranks_with

        if spec is None:
            self.client.reducer = None
            return
        cfg, family = self.hf.config, self.family
        if spec.at_cut and self.split.cut == 0:
            raise UnsupportedModelError("--reducer fastv ranks the image tokens with the device's own layers; it "
                                        "needs --cut 1 or more (at cut 0 use divprune, attention, pool or random)")
        if spec.at_cut:
            fastv_ranks_with(self.parts.decoder, self.client.layers[-1])
        self.client.reducer = TokenReducer(spec, family.num_image_tokens(cfg) - family.trailing_tokens,
                                           family.token_grid(cfg), family.trailing_tokens, family.tower_attention)

    def next_logits(self, input_ids, attention_mask, pixel_values=None, client_cache: KVCache | None = None,
                    server_cache: KVCache | None = None, quantized: bool = True, with_mask: bool = False,
                    server_mask: torch.Tensor | None = None):
        """(B, V) the next token's logits after each row, in one process. quantized: through
        the wire, as a deployment answers (under exact_text the text positions keep their
        own embeddings, as the server agent does with prompt ids); else the unsplit model.
        with_mask: (logits, the device's mask, the server's mask), which the next decode
        steps extend, each on its side: the server's has the image's position steps, and
        under FastV fewer image tokens. server_mask: the server's on a decode step (None:
        attention_mask)."""
        h, e = self.client.through_layers(input_ids, attention_mask, pixel_values, client_cache)
        mask = e.attention_mask if server_mask is None else server_mask
        if quantized:
            logits = self.server.next_logits(self.client.to_wire(h).wire, mask, server_cache, h,
                                             input_ids == self.client.image_token_id)
        else:
            logits = self.server.forward_hidden(h, mask, server_cache, last_positions(h))[:, -1]
        return (logits, e.device_mask, mask) if with_mask else logits

    def parameters(self):
        yield from self.client.parameters()
        yield from self.server.parameters()

    def train(self, mode: bool = True):
        self.client.train(mode)
        self.server.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.client.encoder is not None:
            out.update({f"encoder.{k}": v for k, v in self.client.encoder.state_dict().items()})
            out.update({f"decoder.{k}": v for k, v in self.server.decoder_q.state_dict().items()})
        return out

    def load_quantizer_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.client.encoder is None:
            return
        self.client.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
        self.server.decoder_q.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})


# --------------------------------------------------------------------------- save / load

QUANTIZER_FILE = "quantizer.safetensors"


def fingerprint(model: SplitModel) -> str:
    """SHA-256 over both halves' weights and the split config: device and server compare
    it (first 16 bytes, in every frame) to detect halves from different exports."""
    import hashlib

    config = model.split.to_dict()
    if not config["exact_text"]:
        del config["exact_text"]  # the fingerprints of splits from before the field stay what they were
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for side, module in (("client", model.client), ("server", model.server)):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{side}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                h.update(memoryview(t.view(torch.uint8).numpy()).cast("B"))  # no copy: lm_head is 0.6 GB at real size
    return h.hexdigest()
