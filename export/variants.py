"""The graph variants of a bundle, made from its fp32 ONNX graphs, at any size:

    int8  dynamic MatMul quantization (onnxruntime.quantization), weights per channel
    fp16  float16 weights (the Jetson's CUDA/TensorRT providers), normalisation and
          softmax kept in fp32

A graph whose weights pass ~1.5 GB cannot be one protobuf file (2 GB is protobuf's
ceiling): its weights go to an external data file beside it (`<graph>.data`), which the
manifest lists with its size and sha256 like the graph itself.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from edgeqtl.bundle import FileSpec, GraphSpec, TensorSpec, file_sha256

OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000  # weights above this go to an external data file
# Kept in fp32 in the jetson graph: normalisation and softmax lose too much in fp16.
FP16_BLOCK = ["ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax", "LayerNormalization", "Erf", "Exp"]
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 9: "bool"}


def file_spec(path: Path, root: Path) -> FileSpec:
    return FileSpec(str(path.relative_to(root)), path.stat().st_size, file_sha256(path))


def _data_files(path: Path) -> list[str]:
    """The external data files a graph names (without loading them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)


def graph_spec(path: Path, role: str, variant: str, inputs: list[str], outputs: list[str]) -> GraphSpec:
    """The graph's inputs and outputs read from its protobuf, without loading weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def specs(values, names):
        by_name = {v.name: v for v in values}
        out = []
        for n in names:
            t = by_name[n].type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append(TensorSpec(n, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape))
        return out

    return GraphSpec(role, variant, path.name, OPSET, specs(graph.input, inputs), specs(graph.output, outputs),
                     file_sha256(path), data_files=_data_files(path))


def in_child(convert, src: Path, dst: Path) -> None:
    """Run a variant's conversion in a fresh process when the graph is large. The
    exporter's process keeps the heap that PyTorch and the ONNX exporter grew (freed,
    not returned), and onnxruntime.quantization holds the model two or three times over:
    together they made the real-size export's peak (10.2 GB for a 2.1 GB graph); apart,
    the peak is the larger of the two."""
    external = needs_external_data(src)  # decided here: the child sees the same threshold
    if not external:
        convert(src, dst, external)
        return
    import subprocess
    import sys

    code = (f"from edgeqtl.export.variants import {convert.__name__} as f; import sys; "
            "f(sys.argv[1], sys.argv[2], sys.argv[3] == '1')")
    res = subprocess.run([sys.executable, "-c", code, str(src), str(dst), "1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{convert.__name__} of {src.name} failed in its own process "
                           f"(exit {res.returncode}):\n{res.stderr[-3000:]}")


def needs_external_data(path: Path) -> bool:
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in _data_files(path)) \
        > EXTERNAL_DATA_BYTES


def quantize_int8(src, dst, external: bool | None = None) -> None:
    """int8 weights (per output channel) for every MatMul but the quantizer's in_proj, whose
    outputs are rounded straight to codes (measured on the untrained tiny preset at cut 2:
    per-tensor int8 kept 96.8% of the codes, per-channel with the in_proj in fp32 97.5%).
    Weights use 7 bits (reduce_range): on x86 without VNNI, ONNX Runtime's u8s8 kernels
    (VPMADDUBSW) saturate with 8-bit weights. Measured on an AVX2-only EPYC, the untrained
    small preset at cut 2: 84.3% (prefill) and 80.7% (decode) of the codes agreed with 8-bit
    weights, below the 85% verification needs; 97.0% and 96.6% with 7."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    external = needs_external_data(src) if external is None else external
    with _shape_inference_in_place() if external else contextlib.nullcontext():
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_exclude=[_final_projection(onnx.load(str(src), load_external_data=False))],
                         use_external_data_format=external)


@contextlib.contextmanager
def _shape_inference_in_place():
    """onnxruntime's dynamic quantizer re-runs shape inference on a deep copy of the whole
    model, and loads the result while the copy and the original are both alive: three
    copies of a 1.5 GB graph, the export's peak at real size (4.75 GiB). Here the model is
    written out and reloaded as it is, without the copy (the quantizer replaces it with the
    reloaded one and never reads it again): two. Where onnxruntime has no such step
    (another version), nothing is changed."""
    import tempfile

    import onnx
    from onnxruntime.quantization import onnx_quantizer, quant_utils

    original = getattr(onnx_quantizer, "save_and_reload_model_with_shape_infer", None)
    if original is None or not hasattr(quant_utils, "load_model_with_shape_infer"):
        yield
        return

    def in_place(model):
        with tempfile.TemporaryDirectory(prefix="edgeqtl.quant.") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
            return quant_utils.load_model_with_shape_infer(path)

    onnx_quantizer.save_and_reload_model_with_shape_infer = in_place
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def _final_projection(model) -> str:
    """The last MatMul with a weight initializer: the quantizer's in_proj (nodes are in
    topological order, and nothing but normalisation and rounding follows it)."""
    weights = {t.name for t in model.graph.initializer}
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    if not names:
        raise ValueError("the client graph has no MatMul with weights; nothing to quantize")
    return names[-1]


def convert_fp16(src, dst, external: bool | None = None) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP16_BLOCK)
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES // 2 if external is None else external
    onnx.save(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
              location=dst.name + ".data" if big else None)
