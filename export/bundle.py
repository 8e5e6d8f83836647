"""`edgeqtl export`: a trained split model -> a device bundle plus the server half.

    BUNDLE/
      manifest.json          edgeqtl.bundle.BundleManifest
      client_prefill.onnx    fp32 (cpu, arm64) or fp16 (jetson)
      client_prefill.int8.onnx   dynamic MatMul int8 (cpu, arm64)
      client_decode*.onnx    cut > 0: one token + the client layers' KV cache
      tokenizer.json
      server/                the server half (models/server_half.py)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from edgeqtl.worlds import get_world
from edgeqtl.bundle import MANIFEST_FILE, TARGETS, BundleManifest, TextSpec
from edgeqtl.memory import available_mb, children_peak_rss_mb, peak_rss_mb, release_freed_memory, rss_mb
from edgeqtl.models.batches import image_spec_of
from edgeqtl.models.load import (CheckpointError, generation_record, load_prompts, load_split_model,
                                 read_split_meta)
from edgeqtl.models.reduce import all_image_tokens, reduce_image_tokens, reduction_entry
from edgeqtl.models.server_half import save_server_half, update_server_meta
from edgeqtl.models.split import SplitConfig, SplitModel, fingerprint

from .calibration import fit_entropy_model, user_samples, world_samples
from .graphs import export_decode, export_image, export_prefill, export_tiled_image, kv_shape
from .variants import OPSET, convert_fp16, file_spec, graph_spec, in_child, quantize_int8
from .verify import reference, server_predictor, verify_graphs


@dataclasses.dataclass
class ExportOptions:
    model_dir: Path
    out: Path
    cut: int | None = None
    levels: int | None = None
    target: str = "cpu"
    verify: bool = True
    verify_per_family: int = 100  # a built-in world's held-out questions per family
    calibration_data: Path | None = None  # a folder of images or a LLaVA data file (export/calibration.py)
    calibration_samples: int | None = None  # to fit the entropy model (default: 256; 32 at real size)
    verify_samples: int | None = None  # with calibration data or at real size (default 4)
    batch_size: int | None = None  # PyTorch's batches (default: 64 for short sequences, fewer for long; 2 at real size)
    # cut 0: the prompt's text goes up as token ids, embedded by the server, and the device
    # bundle has no token-embedding table (None: on at cut 0; False: the text as codes too)
    prompt_ids: bool | None = None
    # keep K of each image's tokens on the device (models/reduce.py): a count or a fraction such as 0.125
    image_tokens: str | None = None
    reducer: str | None = None  # divprune (the default), attention, pool, random
    image_splitting: bool = False  # SmolVLM at cut 0: tiles plus a global view (edgeqtl/tiling.py)


@dataclasses.dataclass
class ExportResult:
    manifest: BundleManifest
    out: Path
    seconds: float
    files: dict[str, int]
    verification: "object | None" = None
    peak_rss_mb: float = 0.0


REAL_SIZE_BYTES = 200_000_000  # a checkpoint above this is exported the real-size way


def resolve_split(model_dir: Path, cut: int | None, levels: int | None) -> tuple[SplitConfig, bool]:
    """The split to export. A trained edgeqtl model fixes it (asking for another is an
    error: its quantizer was trained for that cut); a plain checkpoint takes the flags
    and gets a fresh, untrained quantizer. Returns (split, trained)."""
    saved = read_split_meta(model_dir).get("split")
    if saved:
        split = SplitConfig.from_dict(saved)
        if cut is not None and cut != split.cut:
            raise CheckpointError(f"{model_dir} was trained split at cut {split.cut}, not {cut}; "
                                  f"retrain with `edgeqtl train --cut {cut}` or drop --cut")
        if levels is not None and split.quantizer == "fsq" and levels != split.levels:
            raise CheckpointError(f"{model_dir} was trained with {split.levels} levels, not {levels}; "
                                  "retrain or drop --bits/--levels")
        return split, True
    return SplitConfig(cut=cut or 0, levels=levels or 4), False


def text_spec(model: SplitModel, prompts) -> TextSpec:
    return TextSpec("tokenizer.json", prompts.chat, prompts.image_token, model.parts.image_token_id,
                    model.num_image_tokens, int(prompts.eos_token_id), int(prompts.pad_token_id))


class _quiet:
    """Silence the exporter's and quantizer's advisory chatter (torch.export deprecation
    notices, onnxruntime's 'consider pre-processing' log line); errors still surface."""

    def __enter__(self):
        import logging
        import warnings

        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        self._levels = {n: logging.getLogger(n).level for n in ("", "torch.onnx", "torch.export")}
        for n in self._levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        import logging

        for n, lv in self._levels.items():
            logging.getLogger(n).setLevel(lv)
        self._warn.__exit__(*exc)


def export_bundle(opts: ExportOptions, progress=print) -> ExportResult:
    with _quiet():
        return _export_bundle(opts, progress)


def _export_bundle(opts: ExportOptions, progress) -> ExportResult:
    """Load, fit and verify with PyTorch, save the server half, export the client's fp32
    graphs, free PyTorch, make the variants, write the manifest, verify with ONNX Runtime:
    one model in memory at a time."""
    from tqdm import tqdm

    # each step's line carries the peak RSS so far: where memory goes at real size
    say = (lambda line: progress(f"{line}  [RSS {(rss_mb() or 0) / 1024:.2f} GB, peak so far "
                                 f"{peak_rss_mb() / 1024:.2f} GB]")) if progress \
        else (lambda line: None)
    if opts.target not in TARGETS:
        raise CheckpointError(f"target must be one of {TARGETS}, got {opts.target!r}")
    t0 = time.time()
    model_dir, out = Path(opts.model_dir), Path(opts.out)
    split, trained = resolve_split(model_dir, opts.cut, opts.levels)
    if split.quantizer == "identity":
        raise CheckpointError("an identity split sends float32 hidden states; export a trained fsq or fp16 model")
    check_memory(model_dir)
    big = _checkpoint_bytes(model_dir) > REAL_SIZE_BYTES
    model = load_split_model(model_dir, split, lean=big).eval()
    split = model.split  # code_dim resolved (None: the LLM's hidden size)
    reduce_image_tokens(model, opts.image_tokens, opts.reducer)  # else the one the model was trained with
    reduction, reduction_record = model.image_reduction, reduction_entry(model)
    prompt_ids = opts.prompt_ids if opts.prompt_ids is not None else split.cut == 0
    if prompt_ids and split.cut != 0:
        raise CheckpointError(f"prompt ids need cut 0 (this split is at cut {split.cut}): at cut > 0 the text "
                              "positions pass through the device's layers; drop --prompt-ids")
    if split.exact_text and not prompt_ids:
        raise CheckpointError("this model's server embeds the prompt's text itself (exact text at cut 0: an "
                              "adapted model); it needs the prompt as ids: drop --prompt-codes")
    tiling = _tiling(opts, model, prompt_ids)
    if not trained:
        say(f"warning: {model_dir} has no trained edgeqtl quantizer; exporting a fresh one "
            "(adapt it with `edgeqtl train --model ... --data ...` for useful codes)")
    prompts = load_prompts(model_dir, model)
    text, image = text_spec(model, prompts), image_spec_of(model)
    step = say if big else (lambda line: None)  # at real size, a line (with its memory) per step
    fp = fingerprint(model)
    step("fingerprinted the weights")
    fit, check = _samples(opts, model_dir, big, say)
    # PyTorch's batch: activations grow with the sequence (729 image tokens: 64 rows ~3 GB)
    batch = opts.batch_size or (2 if big else max(1, min(64, 16384 // (model.num_image_tokens + 32))))

    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not an edgeqtl bundle; choose an empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # The server half first: at real size its weights (2.4 GB) are then freed before the
    # client's work, which needs none of them. Its entropy model is added once fitted.
    prompts.save(out)
    save_server_half(model, out / "server", fp, out / "tokenizer.json",
                     extra={"text": dataclasses.asdict(text), "entropy": None,
                            "max_context": max_context_of(model), "prompt_ids": prompt_ids,
                            "generation": generation_record(model_dir, model, prompts)})
    step("saved the server half")
    predict = None if big else server_predictor(model)  # small: the server half kept, to compare answers too
    if big:
        _free_server_weights(model)
        step("freed the server half's weights")

    entropy = None
    if split.quantizer == "fsq":
        bar = tqdm(total=len(fit), desc="fit entropy model", disable=progress is None, dynamic_ncols=True)
        with all_image_tokens(model, prompts) as every:  # one entropy model whatever --image-tokens
            entropy = fit_entropy_model(model, fit, every, image, batch, bar.update, image_only=prompt_ids)
        bar.close()
        update_server_meta(out / "server", entropy=entropy.to_list())
    ref = None
    if opts.verify:
        bar = tqdm(total=len(check), desc="PyTorch reference", disable=progress is None, dynamic_ncols=True)
        ref = reference(model, check, prompts, image, batch, bar.update)
        bar.close()
    heads, head_dim = kv_shape(model.client)
    gate = read_split_meta(model_dir).get("step", 0) > 0
    if big and prompt_ids:  # the token table: used by the reference's prompts, in no client graph
        model.parts.decoder.embed_tokens.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        release_freed_memory()
    graphs = _export_graphs(model, out, text, image, split.cut, big, progress and say, prompt_ids,
                            anyres=tiling is not None and tiling.kind == "anyres")
    hidden, layers = model.hidden_size, model.num_layers
    del model
    release_freed_memory()
    step("freed the PyTorch model")
    with_int8 = reduction is None or reduction.int8_safe
    if not with_int8 and opts.target in ("cpu", "arm64"):
        say(f"no int8 graph: --reducer {reduction.reducer} chooses tokens from the tower's output, and int8 "
            "rounding there changes which ones (77-85% of the codes agreed where 85% is needed; docs/MODELS.md, "
            "token reduction); the fp32 graph keeps the choice exact")
    graphs = _variants(graphs, out, opts.target, progress and say, with_int8=with_int8)
    manifest = BundleManifest(fingerprint=fp, cut=split.cut, quantizer=split.quantizer, levels=split.levels,
                              code_dim=split.code_dim if split.quantizer == "fsq" else hidden, hidden_size=hidden,
                              num_layers=layers, num_kv_heads=heads, head_dim=head_dim, image=image, text=text,
                              graphs=graphs, target=opts.target, entropy=entropy.to_list() if entropy else None,
                              max_context=max_context_of_dir(out / "server"), family=family_of(model_dir),
                              prompt_ids=prompt_ids, image_reduction=reduction_record,
                              image_tiling=tiling.to_dict() if tiling else None)
    manifest.files = [file_spec(p, out) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    manifest.save(out)
    result = ExportResult(manifest, out, time.time() - t0, {f.name: f.size for f in manifest.files})
    if ref is not None:
        say(f"verifying {len(manifest.graphs)} graph(s) against PyTorch")
        result.verification = verify_graphs(out, manifest, ref, predict, gate_accuracy=gate)
        step("verified")
    result.seconds = time.time() - t0
    result.peak_rss_mb = max(peak_rss_mb(), children_peak_rss_mb())
    return result


# --------------------------------------------------------------------------- the steps


def family_of(model_dir: Path) -> str | None:
    """The checkpoint's model_type and its LLM's ("llava/qwen2"), for `edgeqtl bundle inspect`."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    outer, inner = config.get("model_type"), (config.get("text_config") or {}).get("model_type")
    return "/".join(str(t) for t in (outer, inner) if t) or None


def _free_server_weights(model: SplitModel) -> None:
    """Once the server half is saved, its weights are dead weight: the trunk after the cut
    and lm_head (2.4 GB at real size) are in no client graph. Freed before the client's
    work (entropy model, reference, the ONNX exporter, whose copies of the client's
    weights come on top)."""
    decoder = model.parts.decoder
    for i in range(model.split.cut, len(decoder.layers)):
        decoder.layers[i] = torch.nn.Identity()
    model.server.layers = torch.nn.ModuleList()
    # tied to the embeddings (a lean load keeps the tie), it lives on with them where the client needs them
    model.parts.lm_head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    release_freed_memory()


def _checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def check_memory(model_dir: Path) -> None:
    """Refuse, with one line, an export this machine's memory cannot hold, instead of
    being killed by the kernel half-way. Asked: 2x the checkpoint's fp32 size (measured
    peak at real size: 1.45x, in the int8 conversion's own process; the rest is headroom)."""
    need = 2 * _checkpoint_bytes(model_dir) / 2 ** 20
    have = available_mb()
    if have is not None and need > have:
        raise CheckpointError(f"exporting {model_dir} needs about {need / 1024:.1f} GB of memory and "
                              f"{have / 1024:.1f} GB is available; close other programs or export on a larger "
                              "machine")


def _samples(opts: ExportOptions, model_dir: Path, big: bool, say) -> tuple[list, list]:
    """(samples to fit the entropy model on, samples to verify on)."""
    n_fit = opts.calibration_samples or (32 if big else 256)
    recorded = read_split_meta(model_dir).get("world")
    world = get_world(recorded)  # a checkpoint not trained on a built-in world falls back to shapes
    n_check = opts.verify_samples or (4 if big else opts.verify_per_family * len(world.FAMILIES))
    if opts.calibration_data is not None:
        both = user_samples(opts.calibration_data, max(n_fit, n_check))
        return both[:n_fit], both[:n_check]
    if recorded is None:
        say("warning: no --calibration-data: fitting the entropy model on shapes images; give a folder of images "
            "like the device's (or your LLaVA data file) for codes as the device will send them")
    return world_samples(n_fit, heldout=False, world=world), world_samples(n_check, heldout=True, world=world)


def max_context_of(model: SplitModel) -> int | None:
    return getattr(model.parts.decoder.config, "max_position_embeddings", None)


def max_context_of_dir(server_dir: Path) -> int | None:
    return json.loads((server_dir / "edgeqtl_server.json").read_text()).get("max_context")


def _export_graphs(model: SplitModel, out: Path, text: TextSpec, image, cut: int, big: bool,
                   progress, prompt_ids: bool = False, anyres: bool = False) -> list[tuple[str, Path, list[str], list[str]]]:
    """The client half's fp32 graphs: (role, path, inputs, outputs)."""
    # example inputs: batch 2 and seq > 1, so that the exporter keeps both dynamic
    n_img = model.num_image_tokens
    ids = torch.full((2, n_img + 6), text.pad_token_id, dtype=torch.long)
    ids[:, 1:1 + n_img] = text.image_token_id
    ids[:, 1 + n_img:] = text.eos_token_id
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    pix = torch.zeros(2, 3, image.size, image.size)
    if anyres:  # two views, the base view's layout plus its newline twice over
        index = torch.cat([torch.arange(n_img), torch.arange(n_img - 1) + n_img - 1, torch.tensor([2 * n_img - 2])])
        todo = [("prefill", lambda p: export_tiled_image(model.client, p, pix, index, OPSET, external_data=big))]
    elif prompt_ids:
        todo = [("prefill", lambda p: export_image(model.client, p, pix, OPSET, external_data=big))]
    else:
        todo = [("prefill", lambda p: export_prefill(model.client, p, (pix, ids, mask), OPSET, external_data=big))]
    if cut > 0:
        todo.append(("decode", lambda p: export_decode(model.client, p, opset=OPSET, external_data=big)))
    done = []
    for role, fn in todo:
        if progress is not None:
            progress(f"exporting the client's {role} graph")
        path = out / f"client_{role}.onnx"
        with torch.inference_mode():
            inputs, outputs = fn(path)
        done.append((role, path, inputs, outputs))
    return done


def _tiling(opts: ExportOptions, model: SplitModel, prompt_ids: bool):
    """The bundle's image splitting, or None; one line for what cannot split."""
    if not opts.image_splitting:
        return None
    spec = model.family.tile_spec(model)
    if spec is None:
        raise CheckpointError(f"--image-splitting is SmolVLM's splitting and LLaVA-OneVision's any-resolution "
                              f"tiling; a {model.family.name} model takes one view per image")
    if not prompt_ids:
        raise CheckpointError("--image-splitting needs cut 0 with prompt ids: the tiles go through the image graph "
                              "as one batch, and their codes up as one image part")
    if model.image_reduction is not None:
        raise CheckpointError("--image-splitting and --image-tokens do not combine yet; choose one")
    return spec


def _variants(graphs, out: Path, target: str, progress, with_int8: bool = True) -> list:
    """fp32 + int8 (cpu, arm64; with_int8 False: fp32 alone) or fp16 alone (jetson), as GraphSpecs."""
    specs = []
    for role, fp32, inputs, outputs in graphs:
        if target in ("cpu", "arm64"):
            specs.append(graph_spec(fp32, role, "fp32", inputs, outputs))
            if not with_int8:
                continue
            if progress is not None:
                progress(f"quantizing the {role} graph to int8")
            int8 = out / f"client_{role}.int8.onnx"
            in_child(quantize_int8, fp32, int8)
            specs.append(graph_spec(int8, role, "int8", inputs, outputs))
        else:  # jetson
            fp16 = out / f"client_{role}.fp16.onnx"
            in_child(convert_fp16, fp32, fp16)
            for f in [fp32, *[out / n for n in graph_spec(fp32, role, "fp32", inputs, outputs).data_files]]:
                f.unlink()
            specs.append(graph_spec(fp16, role, "fp16", inputs, outputs))
    return specs
