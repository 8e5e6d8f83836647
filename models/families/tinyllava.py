"""TinyLLaVA Factory checkpoints (`model_type: tinyllava`), the family Quantized-TinyLLaVA
builds on, converted once into a Llava checkpoint without running their remote code:

    convert(src, out)        edgeqtl convert --model SRC --out OUT

What TinyLLaVA Factory writes (tinyllava/model/modeling_tinyllava.py and its vision
tower, connector and template modules):
- config.json: `text_config` and `vision_config` embedded but diff-only (values equal to
  the class defaults left out), so they are rebuilt with the concrete config classes;
  `vision_feature_layer` (-2), `vision_feature_select_strategy` ("patch" drops the first
  token, which for SigLIP is a real patch: 728 tokens at 384 px; "cls_patch" keeps all),
  `connector_type` ("mlp2x_gelu"), `image_token_index` -200 (not a vocabulary id).
- weights: `language_model.` (a stock *ForCausalLM), `vision_tower._vision_tower.` (a stock
  SiglipVisionModel, with its unused head), `connector._connector.{0,2}.` (Linear, GELU,
  Linear). A tied LLM may lack `language_model.lm_head.weight`.
- prompts: "<system> USER: <image>\\n{question} ASSISTANT:", answers ending in the
  tokenizer's end-of-text token.

The converted checkpoint is a transformers Llava one: the -200 placeholder becomes a real
`<image>` token (an unused row of the embedding table: no resize), repeated once per
image token as Llava expects; the connector is Llava's projector (the same layers);
"patch" maps to Llava's "default" strategy and "cls_patch" to "full".
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .base import UnsupportedModelError

IMAGE_TOKEN = "<image>"
# tinyllava/data/template/qwen2_base_template.py (phi and llama differ only in the end token)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
_DROP_KEYS = ("auto_map", "_name_or_path", "architectures", "model_name_or_path", "model_name_or_path2",
              "transformers_version", "torch_dtype")
_STRATEGY = {"patch": "default", "cls_patch": "full"}
_SHARD_BYTES = 2 << 30


class ConvertError(UnsupportedModelError):
    """A checkpoint that `edgeqtl convert` cannot map; the message says why."""


def chat_template(end_token: str) -> str:
    """TinyLLaVA's prompt as a chat template (Jinja) that models/chat_template.py reduces."""
    return ("{{ " + json.dumps(SYSTEM + " ") + " }}{% for m in messages %}{% if m['role'] == 'user' %}USER: "
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
            "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}" + end_token +
            "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _sub_config(d: dict, what: str):
    from transformers import CONFIG_MAPPING

    d = {k: v for k, v in (d or {}).items() if k not in _DROP_KEYS}
    kind = d.pop("model_type", None)
    if kind not in CONFIG_MAPPING:
        raise ConvertError(f"the checkpoint's {what} has model_type {kind!r}, which transformers does not know")
    return CONFIG_MAPPING[kind](**d)


def llava_config(src_cfg: dict, image_token_id: int):
    """The Llava config of a TinyLLaVA config.json."""
    from transformers import LlavaConfig

    connector = src_cfg.get("connector_type", "")
    m = re.fullmatch(r"mlp(\d+)x_gelu", connector)
    if not m or int(m.group(1)) != 2:
        raise ConvertError(f"connector_type {connector!r} is not supported: only 'mlp2x_gelu' (Llava's projector) "
                           "converts; resampler and Q-Former connectors have no Llava equivalent")
    strategy = src_cfg.get("vision_feature_select_strategy", "patch")
    if strategy not in _STRATEGY:
        raise ConvertError(f"vision_feature_select_strategy {strategy!r} is not one of {sorted(_STRATEGY)}")
    if src_cfg.get("image_aspect_ratio", "square") != "square":
        raise ConvertError(f"image_aspect_ratio {src_cfg['image_aspect_ratio']!r}: only 'square' converts (the "
                           "device resizes every image to the tower's square)")
    text = _sub_config(src_cfg.get("text_config"), "text_config")
    vision = _sub_config(src_cfg.get("vision_config"), "vision_config")
    if hasattr(vision, "vision_use_head"):
        vision.vision_use_head = False  # TinyLLaVA reads a hidden layer; SigLIP's pooling head is never used
    if image_token_id >= text.vocab_size:
        raise ConvertError(f"no free row in the embedding table for {IMAGE_TOKEN!r} (tokenizer holds "
                           f"{image_token_id} tokens, the table {text.vocab_size})")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=src_cfg.get("vision_feature_layer", -2),
                       vision_feature_select_strategy=_STRATEGY[strategy], projector_hidden_act="gelu",
                       tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def _map_key(key: str, wanted: dict) -> str | None:
    """A TinyLLaVA weight name -> the Llava model's (in the installed transformers' layout:
    its SigLIP tower has dropped the `vision_model.` level in 5.x)."""
    rules = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower._vision_tower.vision_model.", "model.vision_tower."),
             ("vision_tower._vision_tower.vision_model.", "model.vision_tower.vision_model."),
             ("vision_tower._vision_tower.", "model.vision_tower."),
             ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
             ("connector._connector.2.", "model.multi_modal_projector.linear_2."))
    candidates = [new + key[len(old):] for old, new in rules if key.startswith(old)]
    return next((c for c in candidates if c in wanted), candidates[0] if candidates else None)


def _tokenizer_with_image_token(src: Path) -> tuple[str, int, str]:
    """(tokenizer.json text with <image> added, its id, the end-of-text token)."""
    from tokenizers import AddedToken, Tokenizer

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ConvertError(f"{src} has no tokenizer.json (TinyLLaVA Factory saves the slow tokenizer); save the "
                           "fast one beside it once: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    tok = Tokenizer.from_file(str(path))
    image_id = tok.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        image_id = tok.token_to_id(IMAGE_TOKEN)
    extra = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    end = extra.get("eos_token") or "<|endoftext|>"
    end = end.get("content") if isinstance(end, dict) else end
    return tok.to_str(), int(image_id), end


def convert(src: str | Path, out: str | Path) -> Path:
    """Write `out`: a Llava checkpoint (config, safetensors shards, tokenizer with <image>,
    chat template, image preprocessing) equivalent to the TinyLLaVA checkpoint `src`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src} has no config.json; pass a TinyLLaVA Factory checkpoint directory")
    src_cfg = json.loads(cfg_path.read_text())
    if src_cfg.get("model_type") != "tinyllava":
        raise ConvertError(f"{src} holds a {src_cfg.get('model_type')!r} model, not a TinyLLaVA one "
                           "(config.json model_type 'tinyllava'); other families load directly")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src} has no .safetensors weights; edgeqtl never unpickles .bin files")
    tokenizer, image_id, end_token = _tokenizer_with_image_token(src)
    config = llava_config(src_cfg, image_id)
    with torch.device("meta"):
        target = LlavaForConditionalGeneration(config)
    wanted = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    tied = config.tie_word_embeddings

    out.mkdir(parents=True, exist_ok=True)
    shards, shard, size, seen = [], {}, 0, set()

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                new = _map_key(key, wanted)
                if key.startswith("vision_tower.") and ".head." in key and new not in wanted:
                    continue  # SigLIP's pooling head: stored, never used
                if new not in wanted:
                    raise ConvertError(f"weight {key!r} has no place in the Llava model; not a TinyLLaVA "
                                       "Factory layout edgeqtl knows (docs/MODELS.md)")
                if new == "lm_head.weight" and tied:
                    continue  # tied to the embedding table
                t = f.get_tensor(key)
                if tuple(t.shape) != wanted[new]:
                    raise ConvertError(f"weight {key!r} has shape {tuple(t.shape)}, the config says {wanted[new]}")
                shard[new], size = t.contiguous(), size + t.numel() * t.element_size()
                seen.add(new)
                if size >= _SHARD_BYTES:
                    flush()
    # SigLIP's post_layernorm, stored but unused by TinyLLaVA (which reads a hidden layer),
    # may be absent: an identity norm takes its place.
    for name in ("model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"):
        if name in wanted and name not in seen:
            shard[name] = torch.ones(wanted[name]) if name.endswith("weight") else torch.zeros(wanted[name])
            seen.add(name)
    flush()
    missing = [k for k in wanted if k not in seen and not (tied and k == "lm_head.weight")]
    if missing:
        raise ConvertError(f"the checkpoint lacks {len(missing)} weights the Llava model needs, e.g. {missing[:3]}")
    weight_map = {k: name for name, keys in shards for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    _write_text_files(src, out, tokenizer, end_token, config)
    return out


def _write_text_files(src: Path, out: Path, tokenizer: str, end_token: str, config) -> None:
    (out / "tokenizer.json").write_text(tokenizer)
    extra = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    extra = {k: v for k, v in extra.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                      "model_max_length")}
    extra.setdefault("eos_token", end_token)
    (out / "tokenizer_config.json").write_text(json.dumps(extra, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template(end_token)}))
    if (src / "generation_config.json").is_file():
        (out / "generation_config.json").write_text((src / "generation_config.json").read_text())
    if (src / "preprocessor_config.json").is_file():
        (out / "preprocessor_config.json").write_text((src / "preprocessor_config.json").read_text())
    else:  # TinyLLaVA takes the tower's own processor: SigLIP's square resize, bicubic, mean = std = 0.5
        size = config.vision_config.image_size
        (out / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
            "image_processor_type": "SiglipImageProcessor"}, indent=2))
