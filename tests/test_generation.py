"""Generation as deployments need it (issue 24): the checkpoint's end ids, per-request
settings within the server's limits, seeded sampling, streaming, an image by reference,
several bundles on one agent, `bundle inspect`, and protocol versions."""
from __future__ import annotations

import dataclasses
import json
import shutil
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from edgeqtl import shapes
from edgeqtl.device_agent.client import DeviceClient
from edgeqtl.errors import RemoteError
from edgeqtl.export.bundle import ExportOptions, export_bundle
from edgeqtl.server_agent.agent import ServerAgent, load_engine
from edgeqtl.server_agent.sampling import GenerationSettings
from edgeqtl.transport import BrokerConfig, RequestClient
from edgeqtl.wire import (FrameKind, InferOptions, ProtocolError, decode_frame, encode_frame, infer_request_frame,
                          new_request_id)

NEVER = 10 ** 9  # an end id no model produces: generation runs to its length limit


def _export(d, cut: int, seed: int = 5, generation_config: dict | None = None, image_first: bool = False,
            prompt_ids: bool | None = None):
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel

    save_checkpoint(SplitModel(build_tiny(seed), SplitConfig(cut=cut, levels=4)), d / "model")
    if generation_config is not None:
        (d / "model" / "generation_config.json").write_text(json.dumps(generation_config))
    if image_first:  # the image before the question, as real VLMs' templates have it
        chat = json.loads((d / "model" / "edgeqtl_chat.json").read_text())
        chat["chat"]["image_first"] = True
        (d / "model" / "edgeqtl_chat.json").write_text(json.dumps(chat))
    export_bundle(ExportOptions(d / "model", d / "bundle", verify=False, prompt_ids=prompt_ids), progress=None)
    return d / "bundle"


@pytest.fixture(scope="module", params=[0, 2], ids=["cut0", "cut2"])
def bundle(request, tmp_path_factory):
    """The image first: at cut > 0 its codes then do not depend on the question, so a
    second question can name them by digest (with the image after the question they
    differ per question, and every question sends its image)."""
    return _export(tmp_path_factory.mktemp(f"gen-cut{request.param}"), request.param, image_first=True)


@pytest.fixture(scope="module")
def bundle0(tmp_path_factory):
    """Cut 0, with prompt ids (the default there)."""
    return _export(tmp_path_factory.mktemp("gen0-cut0"), 0)


@pytest.fixture(scope="module")
def codes_bundle(tmp_path_factory):
    """Cut 0 with the text as codes too (--prompt-codes): what a version 1 server can take."""
    return _export(tmp_path_factory.mktemp("gen0-codes"), 0, prompt_ids=False)


def _engine(bundle, **settings):
    engine = load_engine(bundle / "server")
    engine.settings = GenerationSettings(**{"eos_token_ids": (NEVER,), "max_new_tokens": 8, **settings})
    return engine


def test_prompt_ids_round_trip_and_the_bundle_has_no_embedding_table(bundle0, codes_bundle):
    import onnx

    from edgeqtl.wire import parse_infer_request

    client = DeviceClient(bundle0)
    m = client.manifest
    assert m.prompt_ids and m.graph("prefill").inputs[0].name == "pixel_values" and len(m.graph("prefill").inputs) == 1
    s = shapes.heldout(1)[0]
    ids, _ = client.prompts.encode([s.question])
    req = parse_infer_request(decode_frame(encode_frame(client.request_frame(s.image, s.question))))
    assert np.array_equal(req.prompt_ids, ids[0]) and req.codes.shape[1] == m.text.image_token_count
    vocab = client.prompts.tok.get_vocab_size()

    def weights(bundle):  # {name: (shape, bytes)} of the prefill graph's initializers
        graph = onnx.load(str(bundle / "client_prefill.onnx"), load_external_data=False).graph
        return {i.name: (tuple(i.dims), len(i.raw_data)) for i in graph.initializer}

    ids_w, codes_w = weights(bundle0), weights(codes_bundle)
    table = codes_w["client.embed_tokens.weight"]
    assert table[0] == (vocab, m.hidden_size)  # the prompt-codes graph carries the table ...
    assert not any("embed_tokens" in name for name in ids_w)  # ... the prompt-ids graph does not
    assert sum(b for _, b in codes_w.values()) - sum(b for _, b in ids_w.values()) >= table[1]
    with_ids, with_codes = (len(encode_frame(DeviceClient(b).request_frame(s.image, s.question)))
                            for b in (bundle0, codes_bundle))
    assert with_ids < with_codes  # a few bytes an id against the codes of a whole position


def _request(client: DeviceClient, options: InferOptions = InferOptions(), request_id: bytes | None = None):
    s = shapes.heldout(1)[0]
    _, mask, past = client.encode(s.image, s.question)
    frame = dataclasses.replace(client.request_frame(s.image, s.question, options, request_id), device_id="pi")
    frame.client_state = (client, mask, past)  # for the decode steps at cut > 0
    return frame


def _answer(engine, frame) -> dict:
    """The whole answer in process: at cut > 0 the device's decode steps in lockstep."""
    reply = engine.handle(frame)
    if reply.kind == FrameKind.NEXT_TOKEN:
        client, mask, past = frame.client_state
        while reply.kind == FrameKind.NEXT_TOKEN:
            nxt = reply.json()
            wire, mask, past = client.encode_token(int(nxt["token_id"]), mask, past)
            step = dataclasses.replace(client.frame(FrameKind.DECODE_STEP, wire, frame.request_id, nxt["step"]),
                                       device_id=frame.device_id)
            reply = engine.handle(step)
    assert reply.kind == FrameKind.ANSWER, reply.json()
    return reply.json()


# --------------------------------------------------------------------------- settings


def test_a_generation_config_with_two_end_ids_stops_on_either(bundle0, tmp_path):
    client = DeviceClient(bundle0)
    free = _answer(_engine(bundle0), _request(client))["token_ids"]
    assert len(free) == 8
    # the first token that is not repeated earlier, past the first position: an end id there cuts the answer
    j = next(k for k in range(1, 8) if free[k] not in free[:k])
    eos = [free[j], NEVER - 1]
    other = _export(tmp_path, 0, generation_config={"eos_token_id": eos, "max_new_tokens": 8})
    engine = load_engine(other / "server")
    assert set(eos) <= set(engine.settings.eos_token_ids)  # both, with the tokenizer's own end id
    assert engine.settings.max_new_tokens == 8
    engine.settings = dataclasses.replace(engine.settings, eos_token_ids=tuple(eos))
    assert _answer(engine, _request(client))["token_ids"] == free[:j]
    engine.settings = dataclasses.replace(engine.settings, eos_token_ids=(NEVER - 1, free[0]))
    assert _answer(engine, _request(client))["token_ids"] == []  # the other id, at the first token


def test_a_request_max_new_tokens_is_honoured_and_capped(bundle):
    engine = _engine(bundle, max_new_tokens=8, max_new_tokens_limit=5)
    client = DeviceClient(bundle)
    assert len(_answer(engine, _request(client, InferOptions(max_new_tokens=3)))["token_ids"]) == 3
    capped = _answer(engine, _request(client, InferOptions(max_new_tokens=50)))
    assert len(capped["token_ids"]) == 5 and capped["capped"] == 5
    assert len(_answer(engine, _request(client))["token_ids"]) == 5  # the default (8), within the limit


def test_seeded_sampling_repeats_for_a_retried_request_id(bundle0):
    client = DeviceClient(bundle0)
    hot = InferOptions(temperature=5.0, max_new_tokens=8)
    rid = new_request_id()
    # two agents of one group (no shared cache): a retry that lands on the other gets the same answer
    first = _answer(_engine(bundle0), _request(client, hot, rid))["token_ids"]
    assert _answer(_engine(bundle0), _request(client, hot, rid))["token_ids"] == first
    others = {tuple(_answer(_engine(bundle0), _request(client, hot))["token_ids"]) for _ in range(4)}
    assert others != {tuple(first)}  # sampling does sample: other ids give other answers
    seeded = [_answer(_engine(bundle0), _request(client, dataclasses.replace(hot, seed=7)))["token_ids"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # an explicit seed repeats across request ids


def test_bad_options_are_refused_with_one_line(bundle0):
    client = DeviceClient(bundle0)
    engine = _engine(bundle0, allow_sampling=False)
    reply = engine.handle(_request(client, InferOptions(temperature=0.7)))
    assert reply.kind == FrameKind.ERROR and reply.json()["code"] == "bad_options"
    with pytest.raises(ProtocolError, match="top_p"):
        InferOptions.from_json({"top_p": 1.5})
    with pytest.raises(ProtocolError, match="unknown"):
        InferOptions.from_json({"beams": 4})


def test_stop_strings_cut_the_answer(bundle0):
    client = DeviceClient(bundle0)
    engine = _engine(bundle0)
    free = _answer(engine, _request(client))
    word = engine.tok.decode(free["token_ids"][2:3]).strip()
    assert word
    stopped = _answer(engine, _request(client, InferOptions(stop=(word,))))
    assert word not in stopped["text"] and free["text"].startswith(stopped["text"].rstrip())
    assert len(stopped["token_ids"]) <= 3


# --------------------------------------------------------------------------- over the broker


def test_streamed_tokens_join_to_the_final_answer(bundle, mosquitto):
    client = DeviceClient(bundle)
    engine = _engine(bundle, max_new_tokens=6)
    cfg = BrokerConfig(port=mosquitto.port)
    pieces = []
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-stream") as t:
        s = shapes.heldout(1)[0]
        a = client.ask(t, s.image, s.question, options=InferOptions(stream=1), on_token=pieces.append)
    assert len(a.token_ids) == 6
    assert [t for p in pieces for t in p] == a.token_ids
    assert len(pieces) >= 2  # some came before the answer: streamed (cut 0) or one per round trip (cut > 0)
    assert a.first_token_s is not None and a.first_token_s < a.latency_s
    if client.manifest.cut == 0:
        assert a.round_trips == 1


def test_a_second_question_by_digest_answers_as_a_full_resend_and_a_miss_resends(bundle, mosquitto):
    client, plain = DeviceClient(bundle), DeviceClient(bundle, reuse_images=False)
    engine = _engine(bundle, max_new_tokens=4)
    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    questions = ["how many shapes are there ?", "what color is the circle ?", "is there a square ?"]
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-ref") as t:
        first = client.ask(t, s.image, questions[0])
        second = client.ask(t, s.image, questions[1])
        full = plain.ask(t, s.image, questions[1])
        assert not first.image_by_reference and second.image_by_reference and not full.image_by_reference
        assert second.text == full.text and second.token_ids == full.token_ids
        m = client.manifest
        image_bytes = m.text.image_token_count * m.code_dim * np.log2(m.levels) / 8  # the image's codes, packed
        assert first.bytes_up - second.bytes_up > 0.5 * image_bytes
        engine.images._items.clear()  # the server forgot it (expiry, restart): a miss, then the image again
        third = client.ask(t, s.image, questions[2])
        assert third.text == plain.ask(t, s.image, questions[2]).text
        assert not third.image_by_reference and third.round_trips >= 2
        fourth = client.ask(t, s.image, questions[0])  # held again after the resend
        assert fourth.image_by_reference and fourth.text == first.text
    assert engine.images.hits == 2 and engine.images.misses == 1


def test_a_server_gone_silent_costs_one_wait_not_one_per_image_it_held(bundle, mosquitto, caplog):
    """Two images held by a server that then disappears: the first question after waits
    once, and the device forgets the other image's reference too."""
    import logging

    client = DeviceClient(bundle)
    cfg = BrokerConfig(port=mosquitto.port)
    images = [s.image for s in shapes.heldout(2)]
    with RequestClient(cfg, "pi-gone") as t:
        with ServerAgent(_engine(bundle, max_new_tokens=2), cfg, client_id="srv-gone"):
            for image in images:
                assert not client.ask(t, image, "what color is the circle ?").image_by_reference
        with ServerAgent(_engine(bundle, max_new_tokens=2), cfg), caplog.at_level(logging.INFO, "edgeqtl.device"):
            answers = [client.ask(t, image, "is there a square ?", timeout=1.5) for image in images]
    assert not any(a.image_by_reference for a in answers)
    waits = [r for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(waits) == 1, [r.getMessage() for r in waits]


def test_two_bundles_are_served_by_one_agent(bundle0, tmp_path, mosquitto):
    other = _export(tmp_path / "b", 0, seed=11)
    stranger = DeviceClient(bundle0)
    stranger.manifest.fingerprint = "ab" * 32  # a bundle of a third export, as far as the server can tell
    clients = [DeviceClient(bundle0), DeviceClient(other)]
    engines = [_engine(bundle0, max_new_tokens=4), _engine(other, max_new_tokens=4)]
    alone = [_answer(e, _request(c)) for e, c in zip(engines, clients)]
    assert alone[0]["token_ids"] != alone[1]["token_ids"]  # two different models
    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    with ServerAgent(engines, cfg), RequestClient(cfg, "pi-two") as t:
        for c, a in zip(clients, alone):
            assert c.ask(t, s.image, s.question).token_ids == a["token_ids"]
        with pytest.raises(RemoteError, match="fingerprint_mismatch") as e:
            stranger.ask(t, s.image, s.question)
    for c in clients:
        assert c.manifest.fingerprint_bytes.hex() in str(e.value)  # names what it holds


def test_bundle_inspect_describes_and_flags_a_truncated_file(bundle0, tmp_path):
    from edgeqtl.cli import main

    ok = CliRunner().invoke(main, ["bundle", "inspect", str(bundle0), "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["fingerprint"] == DeviceClient(bundle0).manifest.fingerprint
    assert report["cut"] == 0 and report["levels"] == 4 and report["image_tokens"] > 0
    assert report["family"] and all(v == "ok" for v in report["files"].values())
    assert {v["variant"] for v in report["variants"]} >= {"fp32"}
    copy = tmp_path / "copy"
    shutil.copytree(bundle0, copy)
    victim = copy / "client_prefill.onnx"
    victim.write_bytes(victim.read_bytes()[:-100])
    bad = CliRunner().invoke(main, ["bundle", "inspect", str(copy)])
    assert bad.exit_code == 1
    assert "client_prefill.onnx" in bad.output and "truncated" in bad.output


# --------------------------------------------------------------------------- versions


def _with_version(data: bytes, version: int) -> bytes:
    body = bytearray(data[:-4])
    body[4] = version
    return bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")


def test_frames_go_as_the_lowest_version_that_has_their_features(bundle0, codes_bundle):
    assert encode_frame(_request(DeviceClient(bundle0)))[4] == 2  # prompt ids are version 2
    client = DeviceClient(codes_bundle)
    assert encode_frame(_request(client))[4] == 1  # a plain request: any version 1 server takes it
    assert encode_frame(_request(client, InferOptions(max_new_tokens=3)))[4] == 2
    with pytest.raises(ProtocolError, match="version 1 frame cannot"):
        decode_frame(_with_version(encode_frame(_request(client, InferOptions(max_new_tokens=3))), 1))


def test_a_frame_from_a_newer_version_gets_the_clear_error(bundle0, mosquitto):
    client = DeviceClient(bundle0)
    newer = _with_version(encode_frame(_request(client)), 3)
    with pytest.raises(ProtocolError, match=r"version 3 comes from a newer edgeqtl; this one speaks versions 1 to 2"):
        decode_frame(newer)
    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(_engine(bundle0), cfg), RequestClient(cfg, "pi-new") as t:
        got = []
        import threading

        done = threading.Event()
        from edgeqtl.transport import MqttEndpoint, reply_topic, request_topic

        def on_reply(batch):
            got.extend(batch)
            done.set()

        with MqttEndpoint(cfg, "pi-newer", on_reply, [reply_topic("pi-newer")]) as ep:
            ep.publish(request_topic("pi-newer"), newer, reply_topic("pi-newer"), new_request_id())
            assert done.wait(10)
        err = decode_frame(got[0].payload).json()
        assert err["code"] == "bad_frame" and "versions 1 to 2" in err["message"]
        assert t.endpoint.connected


def test_a_version_1_server_still_answers_and_refuses_options_naming_both(codes_bundle, bundle0, mosquitto):
    import edgeqtl.transport as transport

    real = transport.decode_frame

    def old_decode(data):  # what an edgeqtl that speaks only version 1 says
        if len(data) > 4 and data[:4] == b"EQTL" and data[4] > 1:
            raise ProtocolError(f"frame version {data[4]}; this edgeqtl speaks version 1")
        return real(data)

    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    client, expected = DeviceClient(codes_bundle), DeviceClient(codes_bundle, reuse_images=False)
    with ServerAgent(_engine(codes_bundle, max_new_tokens=4), cfg) as agent, RequestClient(cfg, "pi-old") as t:
        want = expected.ask(t, s.image, s.question).text
        agent.endpoint.handler = _patched(agent, transport, old_decode, real)
        a = client.ask(t, s.image, s.question, options=InferOptions(stream=2))  # v2 (image, stream): falls back
        assert a.text == want and not client.reuse_images
        with pytest.raises(RemoteError, match="older edgeqtl.*version 2.*version 1.*max_new_tokens"):
            client.ask(t, s.image, s.question, options=InferOptions(max_new_tokens=3))
    with ServerAgent(_engine(bundle0, max_new_tokens=4), cfg) as agent, RequestClient(cfg, "pi-old-ids") as t:
        agent.endpoint.handler = _patched(agent, transport, old_decode, real)
        with pytest.raises(RemoteError, match="older edgeqtl.*prompt ids.*--prompt-codes"):
            DeviceClient(bundle0).ask(t, s.image, s.question)


def _patched(agent, transport, old_decode, real):
    def on_requests(batch):
        transport.decode_frame = old_decode
        try:
            return agent._on_requests(batch)
        finally:
            transport.decode_frame = real
    return on_requests


# --------------------------------------------------------------------------- small parts


def test_the_image_cache_is_bounded_by_time_entries_and_bytes():
    from edgeqtl.server_agent.image_cache import ImageCache

    now = [0.0]
    cache = ImageCache(ttl_s=10, max_bytes=3000, per_device=2, clock=lambda: now[0])
    codes = {k: np.full((10, 100), k, np.uint8) for k in range(4)}  # 1,000 bytes each
    assert cache.put("a", "d0", codes[0]) and cache.put("a", "d1", codes[1])
    assert cache.put("a", "d2", codes[2])  # a third for one device pushes out its oldest
    assert cache.get("a", "d0") is None and np.array_equal(cache.get("a", "d2"), codes[2])
    assert cache.put("b", "d3", codes[3]) and cache.nbytes == 3000
    assert cache.put("b", "d4", codes[0])  # over the bytes: the least recently used goes
    assert cache.nbytes <= 3000 and cache.get("a", "d1") is None
    assert cache.get("b", "d3") is not None  # another device's entry is its own
    assert cache.get("a", "d3") is None
    now[0] = 9.0
    assert cache.get("b", "d3") is not None  # used: renewed to 19
    now[0] = 15.0
    assert cache.get("b", "d3") is not None and cache.get("a", "d2") is None  # d2 expired at 10
    assert not cache.put("c", "big", np.zeros((40, 100), np.uint8))  # larger than the whole cache


def test_device_run_jobs_carry_generation_options(tmp_path):
    from edgeqtl.device_agent.runner import JobError, parse_job

    job = parse_job('{"image": "a.png", "prompt": "describe", "max_new_tokens": 64, "temperature": 0.5, '
                    '"stop": ["\\n\\n"]}', tmp_path, "j1")
    assert job.options == InferOptions(max_new_tokens=64, temperature=0.5, stop=("\n\n",))
    with pytest.raises(JobError, match="temperature"):
        parse_job('{"image": "a.png", "prompt": "x", "temperature": "hot"}', tmp_path, "j2")


def test_device_runner_logs_one_json_line_per_job(tmp_path, caplog):
    import io
    import logging

    from edgeqtl.device_agent.client import Answer
    from edgeqtl.device_agent.runner import DeviceRunner
    from edgeqtl.errors import EdgeqtlError

    class Stub:  # the device client's interface, without a model
        def ask(self, transport, image, prompt, timeout, options):
            if "bad" in prompt:
                raise EdgeqtlError("no such image")
            return Answer("3", 1, 0.02, 300, 3000, 1)

    caplog.set_level(logging.INFO, logger="edgeqtl.device.jobs")
    out = io.StringIO()
    lines = ['{"id": "a", "image": "x.png", "prompt": "how many ?"}', '{"id": "b", "image": "x.png", "prompt": "bad"}',
             "not json"]
    DeviceRunner(Stub(), transport=None).run_lines(lines, out, tmp_path)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "edgeqtl.device.jobs"]
    assert [(x["id"], x["ok"]) for x in logged] == [("a", True), ("b", False), ("job-3", False)]
    assert logged[0]["bytes_up"] == 300 and logged[0]["event"] == "job" and "error" in logged[1]


# --------------------------------------------------------------------------- exact text


def test_an_exact_text_split_answers_on_the_server_as_in_process(tmp_path):
    """An adapted model's split (exact_text): the server embeds the prompt ids itself and
    decodes only the image's codes, and its answer is the in-process one, token for token."""
    from edgeqtl.errors import EdgeqtlError
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel, UnsupportedModelError

    model = SplitModel(build_tiny(5), SplitConfig(cut=0, levels=4, exact_text=True))
    save_checkpoint(model, tmp_path / "model")
    export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify=False), progress=None)
    engine = _engine(tmp_path / "bundle")
    assert engine.split.exact_text
    s = shapes.heldout(1)[0]
    served = _answer(engine, _request(DeviceClient(tmp_path / "bundle")))["token_ids"]
    collate = Collator(load_prompts(tmp_path / "model", model), image_spec_of(model))
    batch = collate([world_example(s)], with_answer=False)
    assert served == generate(model, batch, 8, {NEVER})[0] and len(served) == 8
    with pytest.raises(EdgeqtlError, match="--prompt-codes"):
        export_bundle(ExportOptions(tmp_path / "model", tmp_path / "codes", verify=False, prompt_ids=False),
                      progress=None)
    with pytest.raises(UnsupportedModelError, match="cut 0"):
        SplitConfig(cut=2, exact_text=True)
    from edgeqtl.models.steps import SplitTrainConfig
    from edgeqtl.server_agent.training import TrainingService

    with pytest.raises(UnsupportedModelError, match="split training sends every position as codes"):
        TrainingService(model, SplitTrainConfig())
