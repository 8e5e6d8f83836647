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
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from edgeqtl import shapes
from edgeqtl.bundle import TARGETS, BundleManifest, GraphSpec, TensorSpec, TextSpec
from edgeqtl.imageproc import ImageSpec
from edgeqtl.prompt import ChatFormat, load_chat
from edgeqtl.models.load import CheckpointError, load_split_model, read_split_meta
from edgeqtl.models.batches import image_spec_of
from edgeqtl.models.server_half import save_server_half
from edgeqtl.models.split import SplitConfig, SplitModel, fingerprint

from .graphs import export_decode, export_prefill, kv_shape

OPSET = 18
# Kept in fp32 in the jetson graph: normalisation and softmax lose too much in fp16.
FP16_BLOCK = ["ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax", "LayerNormalization", "Erf", "Exp"]


@dataclasses.dataclass
class ExportOptions:
    model_dir: Path
    out: Path
    cut: int | None = None
    levels: int | None = None
    target: str = "cpu"
    verify: bool = True
    verify_per_family: int = 100


@dataclasses.dataclass
class ExportResult:
    manifest: BundleManifest
    out: Path
    seconds: float
    files: dict[str, int]
    verification: "object | None" = None


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


def text_spec(model: SplitModel, model_dir: Path, tokenizer) -> TextSpec:
    image_id = model.parts.image_token_id
    chat = load_chat(model_dir)
    if chat is None:  # a plain HF checkpoint: the LLaVA-1.5 style template
        chat = {"chat": ChatFormat.from_template("USER: {image}\n{prompt} ASSISTANT:"),
                "image_token": tokenizer.id_to_token(image_id)}
    if tokenizer.token_to_id(chat["image_token"]) != image_id:
        raise CheckpointError(f"the tokenizer maps {chat['image_token']!r} to {tokenizer.token_to_id(chat['image_token'])} "
                              f"but the model's image_token_index is {image_id}")
    text_cfg = model.parts.decoder.config
    eos = tokenizer.token_to_id(chat.get("eos_token", "")) if chat.get("eos_token") else None
    eos = eos if eos is not None else (text_cfg.eos_token_id if isinstance(text_cfg.eos_token_id, int) else 0)
    pad = tokenizer.token_to_id(chat.get("pad_token", "")) if chat.get("pad_token") else None
    pad = pad if pad is not None else (text_cfg.pad_token_id if text_cfg.pad_token_id is not None else eos)
    return TextSpec("tokenizer.json", chat["chat"], chat["image_token"], image_id, model.num_image_tokens, int(eos),
                    int(pad))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(float)": "float32",
               "tensor(float16)": "float16", "tensor(int32)": "int32"}


def _tensor_specs(session_io, names) -> list[TensorSpec]:
    by_name = {x.name: x for x in session_io}
    return [TensorSpec(n, _ORT_DTYPES.get(by_name[n].type, by_name[n].type),
                       [d if isinstance(d, int) else str(d) for d in by_name[n].shape]) for n in names]


def _graph_spec(path: Path, role: str, variant: str, inputs, outputs) -> GraphSpec:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return GraphSpec(role, variant, path.name, OPSET, _tensor_specs(sess.get_inputs(), inputs),
                     _tensor_specs(sess.get_outputs(), outputs), _sha256(path))


ENTROPY_SAMPLES = 256
ENTROPY_SEED = 20_231  # generated training questions, never the held-out set


@torch.no_grad()
def fit_entropy_model(model, out: Path, text: TextSpec, image: ImageSpec):
    """Per-dimension code histograms of the PyTorch client on generated samples (the
    prompt's text tokens and the image tokens alike), for entropy coding on the wire."""
    import numpy as np

    from edgeqtl.codec import EntropyModel
    from edgeqtl.imageproc import preprocess
    from edgeqtl.prompt import PromptEncoder

    samples = shapes.train_batch(ENTROPY_SEED, 0, ENTROPY_SAMPLES)
    ids, mask = PromptEncoder.from_bundle(out, text).encode([s.question for s in samples])
    pix = preprocess(np.stack([s.image for s in samples]), image)
    codes = model.client(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pix)).wire.numpy()
    return EntropyModel.from_codes(codes[mask.astype(bool)], model.split.levels)


def quantize_int8(src: Path, dst: Path) -> None:
    """int8 weights (per output channel) for every MatMul but the quantizer's in_proj, whose
    outputs are rounded straight to codes. Measured on the untrained tiny preset at cut 2
    (2-bit range 1.49 sigma): per-tensor int8 kept 96.8% of the codes, and 97.0% with the
    in_proj in fp32; per-channel with the in_proj in fp32 keeps 97.5% (the check needs 97%)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=[_final_projection(onnx.load(str(src), load_external_data=False))])


def _final_projection(model) -> str:
    """The last MatMul with a weight initializer: the quantizer's in_proj (nodes are in
    topological order, and nothing but normalisation and rounding follows it)."""
    weights = {t.name for t in model.graph.initializer}
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    if not names:
        raise ValueError("the client graph has no MatMul with weights; nothing to quantize")
    return names[-1]


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP16_BLOCK)
    onnx.save(model, str(dst))


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
    from tokenizers import Tokenizer

    if opts.target not in TARGETS:
        raise CheckpointError(f"target must be one of {TARGETS}, got {opts.target!r}")
    t0 = time.time()
    model_dir, out = Path(opts.model_dir), Path(opts.out)
    split, trained = resolve_split(model_dir, opts.cut, opts.levels)
    if split.quantizer == "identity":
        raise CheckpointError("an identity split sends float32 hidden states; export a trained fsq or fp16 model")
    model = load_split_model(model_dir, split)
    model.eval()
    if not trained and progress is not None:
        progress(f"warning: {model_dir} has no trained edgeqtl quantizer; exporting a fresh one "
                 "(train it with `edgeqtl train --model ...` for useful codes)")
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json; the device needs it to tokenise prompts")
    tokenizer = Tokenizer.from_file(str(tok_path))
    text = text_spec(model, model_dir, tokenizer)
    image = image_spec_of(model)
    fp = fingerprint(model)

    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise FileExistsError(f"{out} exists and is not an edgeqtl bundle; choose an empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # example inputs: batch 2 and seq > 1, so that the exporter keeps both dynamic
    n_img = model.num_image_tokens
    ids = torch.full((2, n_img + 6), text.pad_token_id, dtype=torch.long)
    ids[:, 1:1 + n_img] = text.image_token_id
    ids[:, 1 + n_img:] = text.eos_token_id
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    pix = torch.zeros(2, 3, image.size, image.size)

    graphs: list[GraphSpec] = []
    steps = [("prefill", lambda p: export_prefill(model.client, p, (pix, ids, mask), OPSET))]
    if split.cut > 0:
        steps.append(("decode", lambda p: export_decode(model.client, p, opset=OPSET)))
    from tqdm import tqdm

    bar = tqdm(total=len(steps) * 2, desc="export", dynamic_ncols=True, disable=progress is None)
    for role, fn in steps:
        fp32 = out / f"client_{role}.onnx"
        with torch.no_grad():
            inputs, outputs = fn(fp32)
        bar.update(1)
        if opts.target in ("cpu", "arm64"):
            graphs.append(_graph_spec(fp32, role, "fp32", inputs, outputs))
            int8 = out / f"client_{role}.int8.onnx"
            quantize_int8(fp32, int8)
            graphs.append(_graph_spec(int8, role, "int8", inputs, outputs))
        else:  # jetson
            fp16 = out / f"client_{role}.fp16.onnx"
            convert_fp16(fp32, fp16)
            fp32.unlink()
            graphs.append(_graph_spec(fp16, role, "fp16", inputs, outputs))
        bar.update(1)
    bar.close()

    heads, head_dim = kv_shape(model.client)
    shutil.copy(tok_path, out / "tokenizer.json")
    entropy = fit_entropy_model(model, out, text, image) if split.quantizer == "fsq" else None
    manifest = BundleManifest(fingerprint=fp, cut=split.cut, quantizer=split.quantizer, levels=split.levels,
                              code_dim=split.code_dim if split.quantizer == "fsq" else model.hidden_size,
                              hidden_size=model.hidden_size, num_layers=model.num_layers, num_kv_heads=heads,
                              head_dim=head_dim, image=image, text=text, graphs=graphs, target=opts.target,
                              entropy=entropy.to_list() if entropy is not None else None)
    manifest.save(out)
    save_server_half(model, out / manifest.server_dir, fp, tok_path,
                     extra={"text": dataclasses.asdict(text), "entropy": manifest.entropy})
    result = ExportResult(manifest, out, time.time() - t0,
                          {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()})
    if opts.verify:
        from .verify import verify_bundle

        result.verification = verify_bundle(model, out, manifest, tokenizer, opts.verify_per_family,
                                            gate_accuracy=read_split_meta(model_dir).get("step", 0) > 0)
    return result

