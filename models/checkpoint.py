"""Saving and loading what training produces, with nothing pickled.

    save_split_model   a split model directory: the HF Llava checkpoint (config.json,
                       model.safetensors), quantizer.safetensors, edgeqtl_split.json
    save_checkpoint    the same plus the tokenizer and chat settings beside it, and the
                       training run that produced it (only when there was one)
    save_state         a training service's state: tensors to safetensors, the rest to
    load_state         JSON, replaced atomically (a crash leaves the previous state whole)
    optimizer_tensors  AdamW state as named tensors plus JSON, and back
    merge_trained      one split model from a split-training run: the server's trunk and
                       one device's client parts (what `edgeqtl merge` writes)

Loading a split model is `models.load.load_split_model`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from edgeqtl.worlds import get_world

from .split import QUANTIZER_FILE, SPLIT_CONFIG_FILE, SplitModel

SERVER_STATE = "server"  # <state dir>/server.json + server-<n>.safetensors


def device_state_name(device_id: str) -> str:
    return f"device-{device_id}"


def save_split_model(model: SplitModel, directory: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from .hf import quiet_transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    model.hf.save_pretrained(directory, safe_serialization=True)
    q = model.quantizer_state()
    if q:
        save_file({k: v.contiguous() for k, v in q.items()}, str(directory / QUANTIZER_FILE))
    meta = {"split": model.split.to_dict(), **(extra or {})}
    if model.image_reduction is not None:  # the device's token reducer (models/reduce.py)
        meta["image_reduction"] = model.image_reduction.to_dict()
    (directory / SPLIT_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def save_checkpoint(model: SplitModel, out_dir: str | Path, train_config=None, step: int = 0,
                    extra: dict | None = None, prompts=None) -> Path:
    """A split model directory that `edgeqtl eval`, `export` and split training load.
    `train_config` (a dataclass) and `step` record the run that trained it; a model that
    was never trained records none, so no one mistakes it for a trained one. `prompts`
    (an edgeqtl.prompt.PromptEncoder): the tokenizer and chat format saved beside it
    (default: the tokenizer of the world `extra` names, else the shapes world's)."""
    extra = {"step": step, **(extra or {})}
    if train_config is not None:
        extra["train"] = dataclasses.asdict(train_config)
    out = save_split_model(model, out_dir, extra=extra)
    (prompts or get_world(extra.get("world")).prompts(model.num_image_tokens)).save(out)
    return out


# --------------------------------------------------------------------------- training state


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors to a fresh <name>-<n>.safetensors, then <name>.json (naming that file)
    replaced atomically: a crash at any point leaves the previous state whole."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    index = path.with_suffix(".json")
    old = json.loads(index.read_text()).get("tensors_file") if index.is_file() else None
    n = 1 + max([int(p.stem.rsplit("-", 1)[1]) for p in path.parent.glob(f"{path.name}-*.safetensors")] or [0])
    tensors_file = f"{path.name}-{n}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path.parent / tensors_file))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, "tensors_file": tensors_file}))
    os.replace(tmp, index)
    if old and old != tensors_file:
        (path.parent / old).unlink(missing_ok=True)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) saved by save_state, or None if there is no state at `path`."""
    from safetensors.torch import load_file

    index = path.with_suffix(".json")
    if not index.is_file():
        return None
    meta = json.loads(index.read_text())
    return load_file(str(path.parent / meta["tensors_file"])), meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict, dict]:
    """AdamW state as named tensors plus JSON (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "opt") -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- merge


def merge_trained(base_dir: str | Path, server_state: str | Path, device_state: str | Path, device_id: str,
                  out_dir: str | Path) -> Path:
    """One split model directory from a split-training run: the starting model, the
    server's trained trunk and one device's trained client parts (with fedavg, the
    devices' parts agree after the last round). `edgeqtl export` takes the result."""
    from .load import CheckpointError, load_prompts, load_split_model

    model = load_split_model(base_dir)
    server = load_state(Path(server_state) / SERVER_STATE)
    device = load_state(Path(device_state) / device_state_name(device_id))
    if server is None:
        raise CheckpointError(f"no server checkpoint in {server_state} ({SERVER_STATE}.json); give the training "
                              "server's --state-dir")
    if device is None:
        raise CheckpointError(f"no checkpoint of device {device_id!r} in {device_state}; give that device's "
                              "--state-dir and --device-id")
    model.server.load_state_dict({k[7:]: v for k, v in server[0].items() if k.startswith("server.")})
    params = dict(model.client.named_parameters())
    # label-private training: the device trained the head (norm, lm_head), the server did not
    params.update({f"head.norm.{n}": p for n, p in model.server.norm.named_parameters()})
    params.update({f"head.lm_head.{n}": p for n, p in model.server.lm_head.named_parameters()})
    with torch.no_grad():
        for name in device[1]["names"]:
            params[name].copy_(device[0][f"client.{name}"])
    private = any(n.startswith("head.") for n in device[1]["names"])
    return save_checkpoint(model, out_dir, step=device[1]["step"],
                           extra={"split_training": True, **({"private_labels": True} if private else {})},
                           prompts=load_prompts(base_dir, model))
