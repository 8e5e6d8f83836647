"""Build a SplitModel from a local Hugging Face checkpoint of a supported VLM family
(models/families: Llava, SmolVLM, LLaVA-OneVision; TinyLLaVA after `edgeqtl convert`).

Only safetensors weights are read: a checkpoint that ships only pickled `.bin` files is
refused rather than `torch.load`ed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from edgeqtl.errors import EdgeqtlError
from edgeqtl.imageproc import ImageSpec
from edgeqtl.prompt import ChatFormat, PromptEncoder, load_chat

from .families import family_of
from .hf import quiet_transformers
from .reduce import ImageReduction
from .split import QUANTIZER_FILE, SPLIT_CONFIG_FILE, SplitConfig, SplitModel, UnsupportedModelError


class CheckpointError(EdgeqtlError, ValueError):
    """A checkpoint directory that cannot be used; the message says why and what to do."""


def _check_checkpoint_dir(directory: Path) -> dict:
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"not a directory: {directory}; pass a Hugging Face checkpoint directory")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        family_of(cfg.get("model_type"))
    except UnsupportedModelError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} has no .safetensors weights; edgeqtl never unpickles .bin files. Convert the "
            "checkpoint once with transformers: model.save_pretrained(dir, safe_serialization=True)")
    return cfg


def load_vlm(directory: str | Path, dtype: torch.dtype = torch.float32, lean: bool = False):
    """The checkpoint's transformers model, of its family's class. lean: read the weights
    into the model's own memory, a few hundred MB at a time (`_load_lean`), instead of
    transformers' memory map of the whole checkpoint."""
    directory = Path(directory)
    model_type = _check_checkpoint_dir(directory).get("model_type")
    family = family_of(model_type)
    quiet_transformers()
    if lean and dtype == torch.float32:
        model = _load_lean(directory, family, model_type)
        if model is not None:
            return model
    return family.hf_class(model_type).from_pretrained(
        directory, use_safetensors=True, dtype=dtype, attn_implementation="eager")


_LEAN_CHUNK_BYTES = 256 << 20


def _load_lean(directory: Path, family, model_type: str):
    """The checkpoint's weights copied tensor by tensor into an uninitialised model, the
    file opened again every ~256 MB. transformers maps the whole file, and every page the
    export reads (all of them, for the fingerprint and the server half) then stays in the
    process's memory beside the model: 5.4 GB at real size where the model is 3.4 GB.
    None where a name does not match (another layout): the caller falls back."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "eager"
    with no_init_weights():
        model = family.hf_class(model_type)(config)
    model.tie_weights()
    state = model.state_dict()
    plan = []  # (file, its tensor names, the model's names for them), all checked before any is read
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            names = [_model_key(k, state, family.checkpoint_prefixes) for k in keys]
            if None in names or any(tuple(f.get_slice(k).get_shape()) != tuple(state[n].shape)
                                    for k, n in zip(keys, names)):
                return None
        plan.append((path, keys, names))
    loaded: set[int] = set()  # storages written (tied weights share one)
    for path, keys, names in plan:
        i = 0
        while i < len(keys):
            with safe_open(str(path), framework="pt") as f:  # closed: its pages leave this process
                done = 0
                while i < len(keys) and done < _LEAN_CHUNK_BYTES:
                    x = f.get_tensor(keys[i])
                    target = state[names[i]]
                    target.copy_(x)
                    loaded.add(target.untyped_storage().data_ptr())
                    done += x.numel() * x.element_size()
                    i += 1
    persistent = dict(model.named_parameters(remove_duplicate=False))
    if any(p.untyped_storage().data_ptr() not in loaded for p in persistent.values()):
        return None  # a weight the files do not hold
    return model.eval()


def _weight_files(directory: Path) -> list[Path]:
    """The model's own weight files (a sharded checkpoint's index names them), not the
    quantizer's beside them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []


def _model_key(key: str, state: dict, prefixes) -> str | None:
    """The model's name for a checkpoint's tensor: the same, or renamed by the family's
    old-layout prefixes (transformers' Llava-style layout before 4.52, which it still reads)."""
    if key in state:
        return key
    for old, new in prefixes:
        if key.startswith(old) and new + key[len(old):] in state:
            return new + key[len(old):]
    return None


def load_split_model(directory: str | Path, split: SplitConfig | None = None, lean: bool = False,
                     reduction=None) -> SplitModel:
    """Load a checkpoint. An edgeqtl directory carries its split config and quantizer;
    a plain checkpoint needs `split` and starts with a fresh quantizer. reduction: keep K
    of each image's tokens on the device (models/reduce.py). lean: for
    export at real size, in the least memory (load_vlm's lean; tied weights stay tied,
    since nothing trains)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    hf_model = load_vlm(directory, lean=lean)
    meta_path = directory / SPLIT_CONFIG_FILE
    saved = SplitConfig.from_dict(json.loads(meta_path.read_text())["split"]) if meta_path.is_file() else None
    if split is None:
        if saved is None:
            raise CheckpointError(f"{directory} is a plain checkpoint; say where to cut (--cut) and the levels")
        split = saved
    elif saved is not None and _same_quantizer(saved, dataclasses.replace(split, code_dim=split.code_dim
                                                                          or saved.code_dim)):
        split = dataclasses.replace(split, clip_sigmas=saved.clip_sigmas)  # the trained quantizer's own range
    model = SplitModel(hf_model, split, untie=not lean)
    model.image_spec = load_image_spec(directory, model)
    # the token reducer: the one asked for, else the one the model was trained with
    model.set_image_reduction(reduction or ImageReduction.from_dict(read_split_meta(directory).get("image_reduction")))
    q_path = directory / QUANTIZER_FILE
    if saved is not None and q_path.is_file() and _same_quantizer(saved, model.split):
        model.load_quantizer_state(load_file(str(q_path)))
    return model


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbers, as HF configs write them


def load_image_spec(directory: Path, model: SplitModel) -> ImageSpec:
    """How the checkpoint's images are preprocessed: its preprocessor_config.json (size,
    mean, std, resampling) when it has one, else the vision tower's size."""
    size = model.family.image_size(model.hf.config)
    pre = directory / "preprocessor_config.json"
    if not pre.is_file():
        return ImageSpec(size, pad_square=model.family.pad_to_square)
    p = json.loads(pre.read_text())
    edge = (p.get("size") or {}).get("longest_edge") if isinstance(p.get("size"), dict) else None
    two_step = edge is not None and "max_image_size" in p  # Idefics3/SmolVLM: longest edge first, then the square
    return ImageSpec(size, tuple(p.get("image_mean", (0.5,) * 3)), tuple(p.get("image_std", (0.5,) * 3)),
                     _RESAMPLE.get(p.get("resample", 3), "bicubic"), int(edge) if two_step else None,
                     model.family.pad_to_square)


def _same_quantizer(a: SplitConfig, b: SplitConfig) -> bool:
    return (a.quantizer, a.levels, a.code_dim, a.cut) == (b.quantizer, b.levels, b.code_dim, b.cut)


def read_split_meta(directory: str | Path) -> dict:
    p = Path(directory) / SPLIT_CONFIG_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def world_of(directory: str | Path):
    """The built-in world (edgeqtl.worlds) a model directory was trained on, as its
    edgeqtl_split.json records it; the shapes world when it records none."""
    from edgeqtl.worlds import get_world

    return get_world(read_split_meta(directory).get("world"))


# The LLaVA-1.5 template, for a plain Llava checkpoint that carries no chat settings of edgeqtl's.
LLAVA_CHAT = ChatFormat.from_template("USER: {image}\n{prompt} ASSISTANT:")


def load_prompts(directory: str | Path, model: SplitModel) -> PromptEncoder:
    """The prompt encoder of a model directory: its tokenizer.json and chat settings
    (edgeqtl_chat.json, written by `edgeqtl train`), or for a plain checkpoint its
    tokenizer with its own chat template reduced (models/chat_template.py; the LLaVA-1.5
    template where it has none) and its special tokens."""
    from tokenizers import Tokenizer

    from .chat_template import find_template, reduce_template

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json; save the tokenizer beside the checkpoint")
    if load_chat(directory) is not None:
        return PromptEncoder.load(directory, model.num_image_tokens)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    image_token = tok.id_to_token(model.parts.image_token_id)
    if image_token is None:
        raise CheckpointError(f"the tokenizer has no token with the model's image_token_index "
                              f"{model.parts.image_token_id}")
    extra = _json(directory / "tokenizer_config.json")
    template = find_template(directory)
    specials = {k: extra.get(k) for k in ("bos_token", "eos_token", "pad_token") if isinstance(extra.get(k), str)}
    chat = reduce_template(template, image_token, specials) if template else LLAVA_CHAT
    chat = dataclasses.replace(chat, image_wrap=model.family.image_wrap)  # SmolVLM's markers around the image
    eos = _token_id(tok, extra.get("eos_token")) or _first(_json(directory / "generation_config.json")
                                                           .get("eos_token_id")) or \
        _first(model.parts.decoder.config.eos_token_id) or 0
    pad = _token_id(tok, extra.get("pad_token"))
    pad = pad if pad is not None else (model.parts.decoder.config.pad_token_id or eos)
    return PromptEncoder(tok, chat, image_token, model.num_image_tokens, pad, eos)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(tok, token) -> int | None:
    if isinstance(token, dict):  # {"content": ...} in some tokenizer configs
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def _first(ids):
    return ids[0] if isinstance(ids, (list, tuple)) and ids else ids


def _ids(value) -> list[int]:
    """An id or a list of ids (generation configs hold either) as a list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def generation_record(directory: str | Path, model: SplitModel, prompts: PromptEncoder) -> dict:
    """The checkpoint's own generation settings, for the server half (server_agent/sampling.py):
    every end-of-sequence id (the tokenizer's, generation_config.json's, the LLM
    config's: a Qwen2 chat model ends on <|im_end|> and on <|endoftext|>), and its
    max_new_tokens, repetition_penalty, and temperature and top_p when it samples."""
    g = _json(Path(directory) / "generation_config.json")
    eos = []
    for ids in (_ids(prompts.eos_token_id), _ids(g.get("eos_token_id")),
                _ids(model.parts.decoder.config.eos_token_id)):
        eos += [t for t in ids if t not in eos]
    record = {"eos_token_ids": eos or [0]}
    if isinstance(g.get("max_new_tokens"), int):
        record["max_new_tokens"] = g["max_new_tokens"]
    if isinstance(g.get("repetition_penalty"), (int, float)) and g["repetition_penalty"] > 0:
        record["repetition_penalty"] = float(g["repetition_penalty"])
    if g.get("do_sample"):  # transformers ignores temperature and top_p when it does not sample
        record["temperature"] = float(g.get("temperature", 1.0))
        record["top_p"] = float(g.get("top_p", 1.0))
    return record


__all__ = ["CheckpointError", "UnsupportedModelError", "load_vlm", "load_split_model", "read_split_meta",
           "load_prompts", "generation_record"]
