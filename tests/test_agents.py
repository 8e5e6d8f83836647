"""Split inference end to end: ONNX device client + server agent over a real mosquitto."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgeqtl import shapes
from edgeqtl.device_agent.client import DeviceClient, ServerError
from edgeqtl.export.bundle import ExportOptions, export_bundle
from edgeqtl.imageproc import preprocess
from edgeqtl.models.load import load_split_model
from edgeqtl.models.split import KVCache, SplitConfig, SplitModel
from edgeqtl.server_agent.agent import ServerAgent, load_engine
from edgeqtl.transport import BrokerConfig, RequestClient
from edgeqtl.wire import FrameKind, codes_frame, new_request_id

MAX_NEW = 3


@pytest.fixture(scope="module", params=[0, 2], ids=["cut0", "cut2"])
def exported(request, tmp_path_factory):
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.training import TrainConfig, save_checkpoint

    d = tmp_path_factory.mktemp(f"agents-cut{request.param}")
    save_checkpoint(SplitModel(build_tiny(5), SplitConfig(cut=request.param, levels=4)), d / "model", TrainConfig(), 0)
    export_bundle(ExportOptions(d / "model", d / "bundle", verify=False), progress=None)
    return d / "model", d / "bundle"


@torch.no_grad()
def reference_answer(model: SplitModel, tokenizer, eos: int, ids: np.ndarray, mask: np.ndarray, pix: np.ndarray):
    """Greedy generation with the in-process PyTorch halves (KV caches on both sides)."""
    c_cache, s_cache = KVCache(), KVCache()
    mask_t = torch.from_numpy(mask)
    wire = model.client(torch.from_numpy(ids), mask_t, torch.from_numpy(pix), c_cache).wire
    out = []
    for _ in range(MAX_NEW):
        tok = int(model.server(wire, mask_t, s_cache)[0, -1].argmax())
        out.append(tok)
        if tok == eos:
            break
        mask_t = torch.cat([mask_t, torch.ones(1, 1, dtype=torch.long)], dim=1)
        wire = model.client(torch.tensor([[tok]]), mask_t, None, c_cache).wire
    return tokenizer.decode([t for t in out if t != eos])


def test_answers_match_in_process_pytorch(exported, mosquitto):
    model_dir, bundle = exported
    model = load_split_model(model_dir).eval()
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    client = DeviceClient(bundle)
    cfg = BrokerConfig(port=mosquitto.port)
    samples = shapes.heldout(10)  # 50 questions, 10 per family
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-test") as transport:
        for s in samples:
            a = client.ask(transport, s.image, s.question, timeout=10)
            ids, mask = client.prompts.encode([s.question])
            ref = reference_answer(model, client.prompts.tok, engine.eos, ids, mask,
                                   preprocess(s.image, client.manifest.image))
            assert a.text == ref, s.question
            # cut 0: the server generates alone; cut > 0: one round trip per generated token
            assert a.round_trips == (1 if client.manifest.cut == 0 else min(a.tokens + 1, MAX_NEW))
            assert a.bytes_up < a.bytes_up_fp16 * 0.2  # 2-bit codes, headers included


def test_device_agent_runs_with_torch_unimportable(exported, mosquitto, tmp_path):
    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    img = tmp_path / "q.png"
    from PIL import Image

    Image.fromarray(shapes.heldout(1)[0].image).save(img)
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("torch is blocked on this device")
        sys.meta_path.insert(0, NoTorch())
        from edgeqtl.device_agent.client import DeviceClient
        from edgeqtl.transport import BrokerConfig, RequestClient
        client = DeviceClient({str(bundle)!r})
        with RequestClient(BrokerConfig(port={mosquitto.port}), "no-torch") as t:
            a = client.ask(t, {str(img)!r}, "what color is the circle ?")
        assert "torch" not in sys.modules
        print("ANSWER", repr(a.text), a.round_trips)
    """)
    with ServerAgent(engine, BrokerConfig(port=mosquitto.port)):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ANSWER" in r.stdout


def test_bad_requests_get_clear_errors_and_service_goes_on(exported, mosquitto):
    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    client = DeviceClient(bundle)
    m = client.manifest
    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-bad") as t:
        wire, _, _ = client.encode(s.image, s.question)
        cases = {
            "fingerprint_mismatch": codes_frame(FrameKind.INFER_REQUEST, wire, m.levels, request_id=new_request_id(),
                                                fingerprint=bytes(16)),
            "bad_shape": codes_frame(FrameKind.INFER_REQUEST, wire[..., :-1], m.levels, request_id=new_request_id(),
                                     fingerprint=m.fingerprint_bytes),
            "bad_codec": codes_frame(FrameKind.INFER_REQUEST, np.minimum(wire, 2), 3, request_id=new_request_id(),
                                     fingerprint=m.fingerprint_bytes),
            "unknown_session": codes_frame(FrameKind.DECODE_STEP, wire[:, :1], m.levels, request_id=new_request_id(),
                                           fingerprint=m.fingerprint_bytes, step=1),
        }
        for code, frame in cases.items():
            reply = t.request(frame, timeout=5)
            assert reply.kind == FrameKind.ERROR and reply.json()["code"] == code, reply.json()
        engine.max_context = 5
        with pytest.raises(ServerError, match="prompt_too_long"):
            client.ask(t, s.image, s.question, timeout=5)
        engine.max_context = 2048
        assert isinstance(client.ask(t, s.image, s.question, timeout=5).text, str)
