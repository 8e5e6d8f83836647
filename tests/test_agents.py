"""Split inference end to end: ONNX device client + server agent over a real mosquitto."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgeqtl import shapes
from edgeqtl.device_agent.client import DeviceClient
from edgeqtl.errors import RemoteError
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
    from edgeqtl.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp(f"agents-cut{request.param}")
    save_checkpoint(SplitModel(build_tiny(5), SplitConfig(cut=request.param, levels=4)), d / "model")
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
        with pytest.raises(RemoteError, match="prompt_too_long"):
            client.ask(t, s.image, s.question, timeout=5)
        engine.max_context = 2048
        assert isinstance(client.ask(t, s.image, s.question, timeout=5).text, str)


def test_demo_runs_end_to_end(tmp_path):
    from click.testing import CliRunner

    from edgeqtl.cli import main

    r = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--steps", "20", "--questions", "10"])
    assert r.exit_code == 0, r.output
    assert "held-out accuracy over the broker" in r.output and "% saved" in r.output
    # a second run reuses the cached model and bundle
    r2 = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--questions", "5"])
    assert r2.exit_code == 0, r2.output
    assert "using the trained model cached" in r2.output and "using the device bundle cached" in r2.output


def _lockstep(engine, client, samples, batched: bool):
    """Drive several generations through the engine at once (one batch per step) or one by one."""
    from edgeqtl.wire import Frame

    states = []
    for s in samples:
        _, mask, past = client.encode(s.image, s.question)
        states.append({"frame": client.request_frame(s.image, s.question), "mask": mask, "past": past,
                       "dev": f"dev-{len(states)}", "answer": None})
    while any(st["answer"] is None for st in states):
        live = [st for st in states if st["answer"] is None]
        frames: list[Frame] = [dataclasses.replace(st["frame"], device_id=st["dev"]) for st in live]
        replies = engine.handle_batch(frames) if batched else [engine.handle(f) for f in frames]
        for st, reply in zip(live, replies):
            assert reply.kind in (FrameKind.ANSWER, FrameKind.NEXT_TOKEN), reply.json()
            if reply.kind == FrameKind.ANSWER:
                st["answer"] = reply.json()["token_ids"]
                continue
            nxt = reply.json()
            wire, st["mask"], st["past"] = client.encode_token(nxt["token_id"], st["mask"], st["past"])
            st["frame"] = client.frame(FrameKind.DECODE_STEP, wire, st["frame"].request_id, nxt["step"])
    return [st["answer"] for st in states]


def test_micro_batch_answers_equal_one_at_a_time(exported):
    """Prompts of different lengths share one left-padded batch; at cut 2 the decode steps
    of different sessions share one pass over their merged KV caches."""
    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    client = DeviceClient(bundle)
    samples = shapes.heldout(2)  # 10 questions, prompts of several lengths
    assert len({len(client.prompts.encode([s.question])[0][0]) for s in samples}) > 1
    assert _lockstep(engine, client, samples, batched=True) == _lockstep(engine, client, samples, batched=False)
    assert not engine.sessions  # every finished generation let go of its cache


def test_two_server_agents_one_killed_every_request_answered_once(exported, mosquitto, tmp_path):
    """Two `edgeqtl server` processes on one shared subscription, four devices asking at
    once. One server hangs (SIGSTOP) with requests routed to it, then is SIGKILLed. The
    devices retry (same request id) or, at cut > 0, restart a generation whose server
    died; every question gets exactly one answer, the one a single server gives."""
    import signal
    import threading
    import time

    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    client = DeviceClient(bundle)
    samples = shapes.heldout(4)  # 20 questions, 5 per device
    cmd = [sys.executable, "-m", "edgeqtl.cli", "server", "serve", "--server-half", str(bundle / "server"), "--broker",
           f"mqtt://127.0.0.1:{mosquitto.port}", "--max-new-tokens", str(MAX_NEW), "--threads", "1"]
    logs = [tmp_path / f"server{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as err:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err))
    answers: dict[int, list[str]] = {i: [] for i in range(len(samples))}
    restarts, answered, errors = [0], threading.Semaphore(0), []
    transports = [RequestClient(BrokerConfig(port=mosquitto.port), f"pi-kill-{d}") for d in range(4)]

    def device(d: int):
        try:
            for i in range(d, len(samples), 4):
                a = client.ask(transports[d], samples[i].image, samples[i].question, timeout=2)
                answers[i].append(a.text)
                restarts[0] += a.restarts
                answered.release()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        deadline = time.time() + 90
        while not all("server agent on" in log.read_text() for log in logs):  # each says so once subscribed
            assert time.time() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.2)
        for t in transports:
            t.start()
        threads = [threading.Thread(target=device, args=(d,)) for d in range(4)]
        for t in threads:
            t.start()
        for _ in range(4):
            assert answered.acquire(timeout=60)
        procs[0].send_signal(signal.SIGSTOP)  # hung: the broker still routes work to it
        time.sleep(1.0)
        procs[0].kill()
        for t in threads:
            t.join(120)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for t in transports:
            t.stop()
    assert not errors, errors
    assert procs[0].returncode == -signal.SIGKILL
    assert all(len(a) == 1 for a in answers.values()), answers
    assert sum(t.resends for t in transports) + restarts[0] >= 1  # some work really was lost with the server
    cfg = BrokerConfig(port=mosquitto.port)
    fresh = DeviceClient(bundle)  # `client` remembers images held by the two servers, both gone now
    with ServerAgent(engine, cfg, group="reference"), RequestClient(cfg, "pi-ref") as t:
        expected = [fresh.ask(t, s.image, s.question, timeout=5).text for s in samples]
    assert [a[0] for a in answers.values()] == expected


def test_device_run_answers_jobs_and_rides_out_a_broker_restart(exported, mosquitto, tmp_path):
    """`edgeqtl device run`'s runner: one answer line per job, bad jobs get an error line,
    a broker restart between jobs loses nothing; a watched folder is answered and moved."""
    import io
    import json

    from PIL import Image

    from edgeqtl.device_agent.runner import DeviceRunner, connect

    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    samples = shapes.heldout(1)[:3]
    for i, s in enumerate(samples):
        Image.fromarray(s.image).save(tmp_path / f"img{i}.png")
    jobs = [json.dumps({"id": "a", "image": "img0.png", "prompt": samples[0].question}),
            json.dumps({"id": "b", "image": "missing.png", "prompt": samples[1].question}),
            "{not json",
            json.dumps({"id": "c", "image": str(tmp_path / "img2.png"), "prompt": samples[2].question})]
    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(engine, cfg):
        transport = connect(cfg, "pi-run")
        try:
            runner = DeviceRunner(DeviceClient(bundle), transport, timeout=3)
            out = io.StringIO()
            runner.run_lines(jobs[:1], out, tmp_path)
            mosquitto.restart()  # both agents reconnect on their own
            runner.run_lines(jobs[1:], out, tmp_path, name="rest")
            lines = [json.loads(x) for x in out.getvalue().splitlines()]
            assert [x["id"] for x in lines] == ["a", "b", "rest-2", "c"]
            assert "answer" in lines[0] and "answer" in lines[3] and lines[0]["bytes_up"] < lines[0]["bytes_up_fp16"]
            assert "image not found" in lines[1]["error"] and "line 2" in lines[2]["error"]

            inbox = tmp_path / "inbox"
            inbox.mkdir()
            (inbox / "batch1.jsonl").write_text("\n".join([jobs[3], jobs[0].replace("img0", str(tmp_path / "img0"))]))
            done = list(runner.watch(inbox, once=True))
            assert [p.name for p in done] == ["batch1.jsonl"] and (inbox / "done" / "batch1.jsonl").is_file()
            answered = [json.loads(x) for x in (inbox / "answers" / "batch1.jsonl").read_text().splitlines()]
            assert [x["id"] for x in answered] == ["c", "a"] and all("answer" in x for x in answered)
            assert [x["answer"] for x in answered] == [lines[3]["answer"], lines[0]["answer"]]
        finally:
            transport.stop()


def test_entropy_coded_requests_get_the_same_answers_with_fewer_bytes(exported, mosquitto):
    _, bundle = exported
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    coded, plain = DeviceClient(bundle), DeviceClient(bundle, entropy=False)
    assert coded.entropy is not None and engine.entropy is not None
    assert coded.entropy.digest == engine.entropy.digest  # one model, in the bundle and the server half
    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-ans") as t:
        for s in shapes.heldout(2):
            a, b = coded.ask(t, s.image, s.question), plain.ask(t, s.image, s.question)
            assert a.text == b.text and a.round_trips == b.round_trips
            assert a.bytes_up <= b.bytes_up
