"""Malformed input: a property test of the frame decoder (hypothesis), and a short run of
the fuzz driver against a running server agent over mosquitto (benchmarks/fuzz.py runs
the long one)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeqtl import shapes
from edgeqtl.fuzz import DEFECTS, fuzz_server, mutants
from edgeqtl.wire import FrameKind, InferOptions, ProtocolError, decode_frame, encode_frame, infer_request_frame, \
    new_request_id


def _decodes_or_refuses(data: bytes) -> None:
    try:
        f = decode_frame(data)
    except ProtocolError:
        return
    assert encode_frame(f) == bytes(data)  # what decodes is exactly what was sent


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_are_refused_with_a_protocol_error(data):
    _decodes_or_refuses(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=44, max_size=512))
def test_any_sealed_body_with_the_magic_decodes_or_is_refused(body):
    body = b"EQTL" + body[4:]
    _decodes_or_refuses(body + zlib.crc32(body).to_bytes(4, "little"))


def test_every_defect_of_the_driver_is_refused_by_the_decoder_or_is_a_frame():
    codes = np.random.default_rng(0).integers(0, 4, (1, 30, 8)).astype(np.uint8)
    from edgeqtl.wire import codes_part

    valid = [encode_frame(infer_request_frame(codes_part(codes, 4), opts, request_id=new_request_id(),
                                              fingerprint=bytes(16), device_id="d"))
             for opts in (InferOptions(), InferOptions(max_new_tokens=4))]
    gen = mutants(valid, np.random.default_rng(1))
    seen = set()
    for _ in range(20 * len(DEFECTS)):
        name, blob = next(gen)
        seen.add(name)
        if blob[:4] != b"EQTC":
            _decodes_or_refuses(blob)
    assert seen == set(DEFECTS)


@pytest.fixture(scope="module")
def served_bundle(tmp_path_factory):
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel

    d = tmp_path_factory.mktemp("fuzz")
    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=4)), d / "model")
    export_bundle(ExportOptions(d / "model", d / "bundle", verify=False), progress=None)
    return d / "bundle"


def test_a_server_under_fuzz_answers_every_valid_question_correctly(served_bundle, mosquitto):
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig

    client = DeviceClient(served_bundle, reuse_images=False)
    engine = load_engine(served_bundle / "server", max_new_tokens=3)
    samples = shapes.heldout(2)[:4]
    valid = []
    for s in samples:
        for opts in (InferOptions(), InferOptions(max_new_tokens=2)):
            valid.append(client.request_frame(s.image, s.question, opts))
    expected = [engine.handle(f).json()["text"] for f in valid[::2]]

    def ask(transport, k):
        return client.ask(transport, samples[k].image, samples[k].question, timeout=10).text

    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(engine, cfg) as agent:
        report = fuzz_server(cfg, valid, expected, ask, count=1500, every=100, seed=3)
        pending = sum(p.size for p in agent.endpoint.reassembler._partials.values())
    assert report.malformed == 1500 and report.valid_asked == 15
    assert report.valid_correct == report.valid_asked, report.failures
    assert report.replies_to_malformed > 1000  # refused out loud, not dropped in silence (chunks are)
    assert pending <= 100 * 256  # what lying chunks left is their few bytes each, bounded, and it expires
    assert len(engine.sessions) == 0 and len(engine.images) <= engine.images.per_device
