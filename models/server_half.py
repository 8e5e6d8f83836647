"""The server half as a directory the server agent loads on its own: quantizer decoder,
decoder layers [cut, N), final norm, lm_head, tokenizer, and the bundle fingerprint. It
does not carry the vision tower, the projector, the embeddings or the client's layers.

    server/
      config.json             the LLM's text config (HF format)
      server_half.safetensors weights, named as in ServerHalf.state_dict(); at cut 0 also
                              token_encoder.* (embedding table + quantizer encoder) so that
                              the server encodes the tokens it generates itself
      edgeqtl_server.json     split config, fingerprint, chat settings
      tokenizer.json
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from edgeqtl.errors import EdgeqtlError

from .families.base import VLMParts
from .split import ServerHalf, SplitConfig

WEIGHTS = "server_half.safetensors"
META = "edgeqtl_server.json"


class ServerHalfError(EdgeqtlError, ValueError):
    """A server-half directory that is missing or incomplete."""


class TokenEncoder(nn.Module):
    """What the client half does to a text token at cut 0 (embed, then quantize), so
    that the server can feed back the tokens it generates without a round trip."""

    def __init__(self, embed: nn.Embedding, encoder: nn.Module | None):
        super().__init__()
        self.embed = embed
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.encoder(h)[0] if self.encoder is not None else h.to(torch.float16)


@dataclasses.dataclass
class ServerBundle:
    server: ServerHalf
    split: SplitConfig
    fingerprint: str
    meta: dict
    token_encoder: TokenEncoder | None = None

    @property
    def fingerprint_bytes(self) -> bytes:
        return bytes.fromhex(self.fingerprint)[:16]


def save_server_half(model, directory, fingerprint: str, tokenizer_file: Path | None, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.parts.decoder.config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.server.state_dict().items()}
    if model.split.cut == 0:
        enc = TokenEncoder(model.client.embed_tokens, model.client.encoder)
        state.update({f"token_encoder.{k}": v.detach().contiguous() for k, v in enc.state_dict().items()})
    seen = set()
    for k, v in state.items():  # safetensors refuses two names for one storage (lm_head tied to the embeddings)
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.untyped_storage().data_ptr())
    save_file(state, str(directory / WEIGHTS))
    meta = {"split": model.split.to_dict(), "fingerprint": fingerprint, "hidden_size": model.hidden_size,
            "num_layers": model.num_layers, **(extra or {})}
    (directory / META).write_text(json.dumps(meta, indent=2))
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, directory / "tokenizer.json")
    return directory


def update_server_meta(directory, **fields) -> None:
    """Set fields of a saved server half's edgeqtl_server.json (export adds the entropy
    model once it is fitted, after the weights are saved and freed)."""
    path = Path(directory) / META
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=2))


def load_server_half(directory, dtype: torch.dtype = torch.float32) -> ServerBundle:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from .quantizer import QuantizerDecoder

    directory = Path(directory)
    for name in ("config.json", WEIGHTS, META):
        if not (directory / name).is_file():
            raise ServerHalfError(f"{directory} is not a server half (no {name}); pass the server/ directory "
                                  "that `edgeqtl export` wrote")
    meta = json.loads((directory / META).read_text())
    split = SplitConfig.from_dict(meta["split"])
    cfg = AutoConfig.from_pretrained(directory)
    cfg._attn_implementation = "eager"
    decoder = AutoModel.from_config(cfg, dtype=dtype)
    # The client's layers and the embeddings stay on the device; drop them here.
    for i in range(split.cut):
        decoder.layers[i] = nn.Identity()
    decoder.embed_tokens = None
    lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
    parts = VLMParts(None, None, decoder, lm_head, -1)
    dec = QuantizerDecoder(split.code_dim, cfg.hidden_size, split.levels) if split.quantizer == "fsq" else None
    server = ServerHalf(parts, split, dec).to(dtype)
    state = load_file(str(directory / WEIGHTS))
    token_encoder = None
    if split.cut == 0:
        from .quantizer import QuantizerEncoder

        enc = QuantizerEncoder(cfg.hidden_size, split.code_dim, split.levels, split.clip_sigmas) if split.quantizer == "fsq" else None
        token_encoder = TokenEncoder(nn.Embedding(cfg.vocab_size, cfg.hidden_size), enc).to(dtype)
        te = {k[len("token_encoder."):]: state.pop(k) for k in list(state) if k.startswith("token_encoder.")}
        token_encoder.load_state_dict(te)
    missing, unexpected = server.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ServerHalfError(f"server half weights do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); re-export it")
    return ServerBundle(server.eval(), split, meta["fingerprint"], meta,
                        token_encoder.eval() if token_encoder is not None else None)
