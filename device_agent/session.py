"""ONNX Runtime sessions, opened one way for the device agent and for export's
verification, so that what is verified is what the device runs.

The execution providers follow the bundle's target: the CPU everywhere, and on a Jetson
TensorRT (fp16, engine cache under ~/.cache/edgeqtl/trt) then CUDA then the CPU, taking
those the installed onnxruntime build has (PyPI's has only the CPU; NVIDIA's Jetson
wheel has CUDA and TensorRT, docs/DEPLOY_JETSON.md).
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("edgeqtl.device")

PROVIDERS = {
    "jetson": [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                              "trt_engine_cache_path": str(Path.home() / ".cache/edgeqtl/trt")}),
               "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
    "arm64": ["CPUExecutionProvider"],
}


def _name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def open_session(path: str | Path, target: str = "cpu", threads: int | None = None):
    """An InferenceSession for one client graph. threads: intra-op threads (None: all cores)."""
    import onnxruntime as ort

    wanted = PROVIDERS[target]
    available = set(ort.get_available_providers())
    providers = [p for p in wanted if _name(p) in available]
    missing = [_name(p) for p in wanted if _name(p) not in available]
    if target == "jetson" and missing:
        log.warning("execution providers %s are not available; running on %s", missing,
                    [_name(p) for p in providers])
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's notices would interleave with our output
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=providers)
