"""The client half as exportable graphs with explicit tensor inputs and outputs.

    prefill:  pixel_values, input_ids, attention_mask
              -> codes [, position_mask, image_positions | image_positions, server_mask]
                 [, present_key_i, present_value_i for each client layer]
    decode:   input_ids (B, 1), attention_mask (B, P + 1), past_key_i, past_value_i ...
              -> codes (B, 1, D), present_key_i, present_value_i ...   (cut > 0 only)
    image:    pixel_values -> codes (B, N image tokens, D) [, image_positions (B, N)]
              (cut 0 with prompt ids: the bundle's prefill graph; no token-embedding
              table on the device)
    tiled:    pixel_values (views), image_index (P,) -> codes (1, P, D)   (the same, for an
              image in several views: LLaVA-OneVision's any-resolution tiling)

The KV cache of the client's layers lives on the device and travels in and out of the
decode graph as plain tensors (B, kv_heads, P, head_dim), so ONNX Runtime needs no
cache object. A token reducer that keeps original positions (models/reduce.py) adds
image_positions, the kept tokens' positions within the image, which the device sends
with the image (wire.ImageRef), and position_mask, the attention mask with their position
steps, which the device's decode steps extend instead of its own. FastV (a reducer at
the cut) adds image_positions and server_mask instead: the device's layers saw every
token, so its decode steps extend its own mask, while the codes hold K image tokens and
server_mask is the mask the server builds for them from the frame (export's check
uses it; the device does not).
"""
from __future__ import annotations

import torch
from torch import nn

from edgeqtl.models.split import ClientHalf, KVCache


def cache_names(cut: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(cut) for kind in ("key", "value")]


def keeps_positions(client: ClientHalf) -> bool:
    """Whether the client's token reducer keeps the image tokens' original positions."""
    return client.reducer is not None and client.reducer.spec.positions == "original"


def positional_outputs(client: ClientHalf) -> list[str]:
    """The prefill graph's outputs between the codes and the KV cache (see the docstring)."""
    if not keeps_positions(client):
        return []
    return ["image_positions", "server_mask"] if client.reducer.spec.at_cut else ["position_mask", "image_positions"]


class PrefillGraph(nn.Module):
    def __init__(self, client: ClientHalf):
        super().__init__()
        self.client = client
        self.cut = len(client.layers)

    def forward(self, pixel_values, input_ids, attention_mask):
        cache = KVCache() if self.cut else None
        out = self.client(input_ids, attention_mask, pixel_values, cache)
        named = {"position_mask": out.device_mask, "image_positions": out.image_positions,
                 "server_mask": out.attention_mask}
        positional = tuple(named[n] for n in positional_outputs(self.client))
        if not self.cut and not positional:
            return out.wire
        return (out.wire, *positional, *[t for i in range(self.cut) for t in cache.kv[i]])


class ImageGraph(nn.Module):
    def __init__(self, client: ClientHalf):
        super().__init__()
        self.client = client

    def forward(self, pixel_values):
        out = self.client.image_wire(pixel_values)
        return (out.wire, out.image_positions) if keeps_positions(self.client) else out.wire


class TiledImageGraph(nn.Module):
    def __init__(self, client: ClientHalf):
        super().__init__()
        self.client = client

    def forward(self, pixel_values, image_index):
        return self.client.tiled_image_wire(pixel_values, image_index).wire


class DecodeGraph(nn.Module):
    def __init__(self, client: ClientHalf):
        super().__init__()
        self.client = client
        self.cut = len(client.layers)

    def forward(self, input_ids, attention_mask, *past):
        cache = KVCache({i: (past[2 * i], past[2 * i + 1]) for i in range(self.cut)})
        wire = self.client(input_ids, attention_mask, None, cache).wire
        return (wire, *[t for i in range(self.cut) for t in cache.kv[i]])


def kv_shape(client: ClientHalf) -> tuple[int, int]:
    """(kv heads, head dim) of the client's decoder layers."""
    cfg = client._decoder.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return heads, head_dim


def export_prefill(client: ClientHalf, path, example, opset: int = 18,
                   external_data: bool = False) -> tuple[list[str], list[str]]:
    """example = (pixel_values, input_ids, attention_mask) with batch >= 2 and seq >= 2:
    the dynamo exporter silently fixes a dimension whose example size is 1."""
    graph = PrefillGraph(client).eval()
    cut = graph.cut
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=8192)
    inputs = ["pixel_values", "input_ids", "attention_mask"]
    outputs = ["codes", *positional_outputs(client), *cache_names(cut, "present")]
    torch.onnx.export(graph, example, str(path), dynamo=True, opset_version=opset, input_names=inputs,
                      output_names=outputs, external_data=external_data, verbose=False,
                      dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch, 1: seq},
                                      "attention_mask": {0: batch, 1: seq}})
    return inputs, outputs


def export_image(client: ClientHalf, path, pixel_values, opset: int = 18,
                 external_data: bool = False) -> tuple[list[str], list[str]]:
    """The prompt-ids prefill graph: pixels in, the image positions' codes out. Only the
    vision tower, the projector and the quantizer's encoder are in it."""
    graph = ImageGraph(client).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    inputs, outputs = ["pixel_values"], ["codes", *(["image_positions"] if keeps_positions(client) else [])]
    torch.onnx.export(graph, (pixel_values,), str(path), dynamo=True, opset_version=opset, input_names=inputs,
                      output_names=outputs, external_data=external_data, verbose=False,
                      dynamic_shapes={"pixel_values": {0: batch}})
    return inputs, outputs


def export_tiled_image(client: ClientHalf, path, pixel_values, image_index, opset: int = 18,
                       external_data: bool = False) -> tuple[list[str], list[str]]:
    """The prompt-ids prefill graph of an image in several views (OneVision's any-resolution):
    views' pixels and the layout index in, the image positions' codes (1, P, D) out."""
    graph = TiledImageGraph(client).eval()
    views = torch.export.Dim("views", min=1, max=64)
    positions = torch.export.Dim("positions", min=2, max=65536)
    inputs, outputs = ["pixel_values", "image_index"], ["codes"]
    torch.onnx.export(graph, (pixel_values, image_index), str(path), dynamo=True, opset_version=opset,
                      input_names=inputs, output_names=outputs, external_data=external_data, verbose=False,
                      dynamic_shapes={"pixel_values": {0: views}, "image_index": {0: positions}})
    return inputs, outputs


def export_decode(client: ClientHalf, path, batch_size: int = 2, past_len: int = 7, opset: int = 18,
                  external_data: bool = False):
    graph = DecodeGraph(client).eval()
    cut = graph.cut
    heads, head_dim = kv_shape(client)
    dtype = next(client.parameters()).dtype
    ids = torch.full((batch_size, 1), 1, dtype=torch.long)
    mask = torch.ones(batch_size, past_len + 1, dtype=torch.long)
    past = [torch.zeros(batch_size, heads, past_len, head_dim, dtype=dtype) for _ in range(2 * cut)]
    batch = torch.export.Dim("batch", min=1, max=1024)
    past_dim = torch.export.Dim("past", min=1, max=8192)
    inputs = ["input_ids", "attention_mask", *cache_names(cut, "past")]
    outputs = ["codes", *cache_names(cut, "present")]
    dyn = {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past_dim + 1},
           "past": tuple({0: batch, 2: past_dim} for _ in range(2 * cut))}
    torch.onnx.export(graph, (ids, mask, *past), str(path), dynamo=True, opset_version=opset, input_names=inputs,
                      output_names=outputs, external_data=external_data, verbose=False, dynamic_shapes=dyn)
    return inputs, outputs
