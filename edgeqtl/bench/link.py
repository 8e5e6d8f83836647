"""The `link` suite: time per answer over emulated links (NB-IoT .. Wi-Fi), split into
device compute, transfer and server compute, for 16-bit hidden states, 2-bit packed codes
and 2-bit entropy-coded codes, at cut 0 and cut 2.

Per measurement: mosquitto on loopback, a server agent in this process connected to it
directly, a link relay (edgeqtl.link) in front of it, and the device client connected
through the relay. The split is measured, not modelled:
  - device compute: the client's ONNX graphs and frame building (prefill, each decode
    step, packing or entropy coding), timed around DeviceClient.encode, encode_token and
    frame by a subclass kept in this module;
  - server compute: the agent's handle_batch (decoding the frame, the server half's
    forward passes, the reply built), timed around it on the agent's worker thread;
  - transfer: the answer's wall time less both: time on the shaped link and waiting
    for it, plus the broker's and paho's own time on loopback (the MQTT stack).

The tiny preset's frames are a few KB, less than one round trip's worth of a 4G link,
so its transfer is mostly latency. Real-size frames are emulated too, without the model:
payloads of exactly the request sizes measured for llava-interleave-qwen-0.5b
(README, "Bring your own checkpoint") are sent through the same relay to an MQTT echo
that replies at once with an ANSWER-sized payload, and timed request to reply.

With --model or --bundle the suite measures the user's bundle instead (link_own.py).
"""
from __future__ import annotations

import dataclasses
import statistics
import threading
import time

from . import fixtures
from .report import BenchContext, Section, markdown_table, new_figure, save_figure

TITLE = "Time per answer over emulated links: device, transfer, server"

# Request frames of llava-interleave-qwen-0.5b (729 image tokens, hidden 1024, cut 0,
# 2 bits), headers included, as measured by benchmarks/real_size.py (README, "Bring your
# own checkpoint"). Inputs of the emulation, not results of this suite; the entropy-coded
# size is of random weights (skewed codes), not a trained model's.
REAL_SIZE_MODEL = "llava-interleave-qwen-0.5b"
REAL_SIZE_BYTES_UP = {"16-bit": 1_547_776, "2-bit packed": 193_543, "2-bit entropy-coded": 93_768}

FRAME_KINDS = ("16-bit", "2-bit packed", "2-bit entropy-coded")
CUTS = (0, 2)
QUICK_PROFILES = ("4g", "wifi")
HEADLINE_PROFILE = "4g"
TRANSFER_GOAL = 4.0  # the goal: 2-bit frames transfer >= 4x faster than 16-bit

ECHO_TOPIC = "edgeqtl/bench/link-echo/req"
ECHO_REPLY_TOPIC = "edgeqtl/bench/link-echo/reply"


def _questions_per_profile(ctx: BenchContext, profile: str) -> int:
    if ctx.quick:
        return 5
    return {"nbiot": 3, "ltem": 5}.get(profile, 10)  # seconds-long round trips: fewer questions


def _real_size_repeats(ctx: BenchContext, profile: str) -> int:
    if profile == "nbiot":
        return 1  # a 16-bit frame takes ~3.5 minutes at 60 kbit/s
    return 3 if ctx.quick else 5


def _trip_timeout(profile, bytes_up: int, bytes_down: int = 4096) -> float:
    """Seconds to wait for one reply: generous, but bounded (a lost reply fails the suite
    instead of hanging it)."""
    link_s = 2 * (profile.delay + profile.jitter) + 8 * bytes_up / profile.up + 8 * bytes_down / profile.down
    return 30.0 + 3 * link_s


def _settle(profile) -> None:
    """Let the trailing MQTT acknowledgements cross the relay before reading its counters."""
    time.sleep(min(2 * (profile.delay + profile.jitter) + 0.05, 5.0))


# --------------------------------------------------------------------------- clocks


class _ComputeClock:
    """Seconds accumulated by timed calls, possibly from another thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds

    def take(self) -> float:
        """The seconds so far, and start again from zero."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds


def _timed_device_client(bundle, entropy: bool):
    """A DeviceClient whose compute (ONNX graphs, packing, entropy coding) is clocked."""
    from edgeqtl.device_agent.client import DeviceClient

    class TimedDeviceClient(DeviceClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clock = _ComputeClock()

        def _timed(self, method, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.clock.add(time.perf_counter() - t0)

        # ask() runs _encode (graph), prompt_request (packing) and, at cut > 0, encode_token
        # and frame for each decode step: the four are the device's compute.
        def _encode(self, image, prompt):
            return self._timed(super()._encode, image, prompt)

        def prompt_request(self, *args, **kwargs):
            return self._timed(super().prompt_request, *args, **kwargs)

        def encode_token(self, token_id, mask, past):
            return self._timed(super().encode_token, token_id, mask, past)

        def frame(self, kind, wire, request_id, step):
            return self._timed(super().frame, kind, wire, request_id, step)

    return TimedDeviceClient(bundle, entropy=entropy)


def _clock_server(agent) -> _ComputeClock:
    """Time the agent's handler (the Responder calls self.handle_batch for every batch)."""
    clock = _ComputeClock()
    handle_batch = agent.handle_batch

    def timed_handle_batch(frames):
        t0 = time.perf_counter()
        try:
            return handle_batch(frames)
        finally:
            clock.add(time.perf_counter() - t0)

    agent.handle_batch = timed_handle_batch
    return clock


# --------------------------------------------------------------------------- the model's answers


def _measure_bundle(ctx: BenchContext, bundle, cut: int, kinds: list[tuple[str, bool]], profiles: list[str],
                    questions: dict[str, list]) -> list[dict]:
    """One bundle (one server half): for each profile and frame kind, the questions asked
    through a fresh relay and connection. Returns one row per (profile, kind)."""
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.bundle import BundleManifest
    from edgeqtl.link import PROFILES, LinkRelay
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    engine = load_engine(bundle / "server", max_new_tokens=4 if ctx.quick else 8)
    manifest = BundleManifest.load(bundle)
    for kind, entropy in kinds:
        if kind.startswith("2-bit") and manifest.quantizer != "fsq":
            raise RuntimeError(f"bundle {bundle} sends {manifest.quantizer} hidden states, not codes")
        if entropy and manifest.entropy is None:
            raise RuntimeError(f"bundle {bundle} has no entropy model: cannot measure entropy-coded frames")
    rows = []
    with MosquittoBroker() as broker:
        agent = ServerAgent(engine, BrokerConfig(port=broker.port), client_id=f"bench-link-srv-cut{cut}")
        server_clock = _clock_server(agent)
        with agent:
            for name in profiles:
                profile = PROFILES[name]
                for kind, entropy in kinds:
                    # A client of its own per row: one that remembered the images of the previous row
                    # would name them to this row's device id, which the server never saw (a resend).
                    client = _timed_device_client(bundle, entropy)
                    relay = LinkRelay("127.0.0.1", 0, "127.0.0.1", broker.port, profile).start()
                    try:
                        cfg = BrokerConfig(port=relay.port)
                        device_id = f"bench-link-{name}-cut{cut}-{kind.replace(' ', '-')}"
                        transport = RequestClient(cfg, device_id).start(timeout=_trip_timeout(profile, 4096))
                        try:
                            rows.append(_ask_all(client, transport, server_clock, relay, profile, kind, cut,
                                                 questions[name]))
                        finally:
                            transport.stop()
                    finally:
                        relay.stop()
    return rows


def _ask_all(client, transport, server_clock, relay, profile, kind: str, cut: int, qs: list) -> dict:
    m = client.manifest
    # The largest frame a question sends, for the timeout: 16-bit hidden states of the prompt.
    biggest = 256 + 2 * m.hidden_size * max(client.prompts.encode([q.question])[0].shape[1] for q in qs)
    timeout = _trip_timeout(profile, biggest)
    # Warm-up (not timed): ONNX Runtime's and PyTorch's first runs allocate and plan.
    client.ask(transport, qs[0].image, qs[0].question, timeout=timeout, retries=0, restarts=0)
    _settle(profile)
    client.clock.take()
    server_clock.take()
    up0, down0 = relay.bytes_up, relay.bytes_down
    per_question = []
    for q in qs:
        # retries=0, restarts=0: a resent request would count its wait as transfer; fail instead
        answer = client.ask(transport, q.image, q.question, timeout=timeout, retries=0, restarts=0)
        device_s, server_s = client.clock.take(), server_clock.take()
        per_question.append({"total_s": answer.latency_s, "device_s": device_s, "server_s": server_s,
                             "transfer_s": answer.latency_s - device_s - server_s, "bytes_up": answer.bytes_up,
                             "bytes_up_16bit": answer.bytes_up_fp16, "round_trips": answer.round_trips,
                             "tokens": answer.tokens})
    _settle(profile)
    tcp_up, tcp_down = (relay.bytes_up - up0) / len(qs), (relay.bytes_down - down0) / len(qs)
    median = lambda key: statistics.median(p[key] for p in per_question)  # noqa: E731
    mean = lambda key: statistics.mean(p[key] for p in per_question)  # noqa: E731  (bytes: per question on average, as the relay's)
    device_ms, transfer_ms, server_ms = (1e3 * median(k) for k in ("device_s", "transfer_s", "server_s"))
    return {"profile": profile.name, "cut": cut, "frame": kind, "questions": len(qs),
            "bytes_up": mean("bytes_up"), "bytes_up_16bit": mean("bytes_up_16bit"),
            "tcp_bytes_up": tcp_up, "tcp_bytes_down": tcp_down, "round_trips": mean("round_trips"),
            "device_ms": device_ms, "transfer_ms": transfer_ms, "server_ms": server_ms,
            # the sum of the parts' medians, so that the split adds up; the measured median beside it
            "total_ms": device_ms + transfer_ms + server_ms, "measured_total_ms": 1e3 * median("total_s"),
            "per_question": per_question}


# --------------------------------------------------------------------------- real-size frames, no model


def _answer_reply_bytes() -> int:
    """The size of a real ANSWER frame of 8 tokens: what the echo sends back."""
    from edgeqtl.wire import FrameKind, encode_frame, json_frame, new_request_id

    frame = json_frame(FrameKind.ANSWER, {"text": " ".join(["word"] * 8), "tokens": 8, "token_ids": [1000] * 8},
                       request_id=new_request_id(), fingerprint=bytes(16))
    return len(encode_frame(frame))


def _measure_real_size(ctx: BenchContext, profiles: list[str], sizes: dict[str, int] = REAL_SIZE_BYTES_UP) -> list[dict]:
    """Payloads of the given request sizes ({frame kind: bytes}; default the real-size
    model's) through the relay to an echo on the broker."""
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.link import PROFILES, LinkRelay
    from edgeqtl.transport import BrokerConfig, MqttEndpoint

    reply_bytes = _answer_reply_bytes()
    rows = []
    with MosquittoBroker() as broker:
        echo_reply = bytes(reply_bytes)

        def echo(batch):
            for m in batch:
                echo_endpoint.publish(m.response_topic or ECHO_REPLY_TOPIC, echo_reply, correlation=m.correlation)

        echo_endpoint = MqttEndpoint(BrokerConfig(port=broker.port), "bench-link-echo", echo, [ECHO_TOPIC])
        echo_endpoint.start()
        try:
            for name in profiles:
                profile = PROFILES[name]
                for kind, size in sizes.items():
                    rows.append(_echo_times(ctx, broker.port, profile, kind, size, reply_bytes,
                                            _real_size_repeats(ctx, name), LinkRelay, MqttEndpoint, BrokerConfig))
        finally:
            echo_endpoint.stop()
    return rows


def _echo_times(ctx, broker_port: int, profile, kind: str, size: int, reply_bytes: int, repeats: int,
                LinkRelay, MqttEndpoint, BrokerConfig) -> dict:
    timeout = _trip_timeout(profile, size)
    replies: dict[bytes, threading.Event] = {}

    def on_reply(batch):
        for m in batch:
            event = replies.get(m.correlation)
            if event is not None:
                event.set()

    payload = bytes(size)
    relay = LinkRelay("127.0.0.1", 0, "127.0.0.1", broker_port, profile).start()
    try:
        # keepalive above the transfer time: the broker must not drop a client mid-frame
        cfg = BrokerConfig(port=relay.port, keepalive=int(max(30, 2 * timeout)))
        endpoint = MqttEndpoint(cfg, f"bench-link-emu-{profile.name}-{kind.replace(' ', '-')}", on_reply,
                                [ECHO_REPLY_TOPIC])
        endpoint.start(timeout=_trip_timeout(profile, 4096))
        try:
            _settle(profile)  # the subscription's acknowledgement, before the counters are read
            up0, down0 = relay.bytes_up, relay.bytes_down
            times = []
            for i in range(repeats):
                correlation = f"{kind}/{i}".encode()
                replies[correlation] = event = threading.Event()
                t0 = time.perf_counter()
                endpoint.publish(ECHO_TOPIC, payload, ECHO_REPLY_TOPIC, correlation)
                if not event.wait(timeout):
                    raise TimeoutError(f"the echo did not answer a {size:,} B request over {profile.describe()} "
                                       f"within {timeout:.0f} s")
                times.append(time.perf_counter() - t0)
            _settle(profile)
            tcp_up, tcp_down = (relay.bytes_up - up0) / repeats, (relay.bytes_down - down0) / repeats
        finally:
            endpoint.stop()
    finally:
        relay.stop()
    transfer_ms = 1e3 * statistics.median(times)
    return {"profile": profile.name, "cut": 0, "frame": kind, "repeats": repeats, "bytes_up": size,
            "bytes_down": reply_bytes, "tcp_bytes_up": tcp_up, "tcp_bytes_down": tcp_down,
            "transfer_ms": transfer_ms, "times_ms": [1e3 * t for t in times],
            # what the link alone predicts: serialization each way plus the round trip's delay
            "link_model_ms": 1e3 * (8 * size / profile.up + 8 * reply_bytes / profile.down + 2 * profile.delay)}


# --------------------------------------------------------------------------- the section


def _find(rows: list[dict], profile: str, frame: str, cut: int = 0) -> dict | None:
    return next((r for r in rows if r["profile"] == profile and r["frame"] == frame and r["cut"] == cut), None)


def _headline(model_rows: list[dict], real_rows: list[dict]) -> dict:
    """At 4G: time per answer and transfer speed-up of 2-bit frames over 16-bit."""
    out = {"profile": HEADLINE_PROFILE, "goal_transfer_speedup": TRANSFER_GOAL, "tiny": {}, "real_size": {}}
    for cut in CUTS:
        base = _find(model_rows, HEADLINE_PROFILE, "16-bit", cut)
        if base is None:
            continue
        for kind in FRAME_KINDS[1:]:
            r = _find(model_rows, HEADLINE_PROFILE, kind, cut)
            if r is not None:
                out["tiny"][f"cut{cut}/{kind}"] = {
                    "total_ms": r["total_ms"], "total_ms_16bit": base["total_ms"],
                    "transfer_ms": r["transfer_ms"], "transfer_ms_16bit": base["transfer_ms"],
                    "transfer_speedup": base["transfer_ms"] / r["transfer_ms"],
                    "answer_speedup": base["total_ms"] / r["total_ms"]}
    out["real_size"] = transfer_speedups(real_rows, FRAME_KINDS[1:])
    return out


def transfer_speedups(echo_rows: list[dict], kinds) -> dict:
    """{kind: transfer ms against the 16-bit row's, at the headline profile, and the goal}."""
    out = {}
    base = _find(echo_rows, HEADLINE_PROFILE, "16-bit")
    for kind in kinds:
        r = _find(echo_rows, HEADLINE_PROFILE, kind)
        if base is not None and r is not None:
            out[kind] = {"transfer_ms": r["transfer_ms"], "transfer_ms_16bit": base["transfer_ms"],
                         "transfer_speedup": base["transfer_ms"] / r["transfer_ms"],
                         "meets_goal": base["transfer_ms"] / r["transfer_ms"] >= TRANSFER_GOAL}
    return out


def _plot(ctx: BenchContext, model_rows: list[dict], real_rows: list[dict], profiles: list[str]):
    import numpy as np

    colors = {"device": "#4c72b0", "transfer": "#dd8452", "server": "#55a868"}
    bars = [(cut, kind) for cut in CUTS for kind in FRAME_KINDS]
    short = {"16-bit": "16-bit", "2-bit packed": "2-bit", "2-bit entropy-coded": "2-bit ent."}
    # One panel per link, each on its own linear scale: NB-IoT's seconds would flatten Wi-Fi's milliseconds.
    fig, _ = new_figure(max(6.4, 3.2 * len(profiles)), 4.4)
    fig.clear()
    axes = fig.subplots(1, len(profiles), squeeze=False)[0]
    for ax, profile in zip(axes, profiles):
        labels = []
        for b, (cut, kind) in enumerate(bars):
            r = _find(model_rows, profile, kind, cut)
            bottom = 0.0
            for part in ("device", "transfer", "server"):
                value = r[f"{part}_ms"] if r is not None else 0.0
                ax.bar(b, value, 0.8, bottom=bottom, color=colors[part],
                       label=part if ax is axes[0] and b == 0 else None)
                bottom += value
            labels.append(f"{short[kind]}\ncut {cut}")
        ax.set_xticks(range(len(bars)), labels, rotation=90, fontsize=7)
        ax.set_title(profile, fontsize=9)
    axes[0].set_ylabel("ms per answer (median of each part)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ctx.preset} preset: time per answer, device / transfer / server", fontsize=9)
    split_png = save_figure(fig, ctx.path("link_split.png"))

    fig, ax = new_figure(6.4, 3.6)
    x = np.arange(len(profiles))
    width = 0.8 / len(FRAME_KINDS)
    for k, kind in enumerate(FRAME_KINDS):
        ys = [(_find(real_rows, p, kind) or {}).get("transfer_ms", float("nan")) for p in profiles]
        ax.bar(x + (k - 1) * width, ys, width * 0.9, label=kind)
    ax.set_xticks(x, profiles)
    ax.set_yscale("log")
    ax.set_ylabel("ms request to reply (median)")
    ax.set_title(f"transfer of real-size frame sizes ({REAL_SIZE_MODEL}), no model", fontsize=9)
    ax.legend(fontsize=7)
    real_png = save_figure(fig, ctx.path("link_real_size.png"))
    return [split_png, real_png]


def run(ctx: BenchContext) -> Section:
    from edgeqtl.broker import find_mosquitto
    from edgeqtl.link import PROFILES

    if find_mosquitto() is None:
        raise RuntimeError("the link suite needs mosquitto (apt-get install mosquitto)")
    profiles = list(QUICK_PROFILES if ctx.quick else PROFILES)
    if ctx.model is not None or ctx.bundle is not None:
        from .link_own import run_own

        return run_own(ctx, profiles)
    if ctx.data is not None:
        # Without a model of the user's, the suite compares the preset's own 16-bit and 2-bit models.
        ctx.echo(f"  link: --data is used with --model or --bundle; the suite measures the {ctx.preset} preset's "
                 "own 16-bit and 2-bit models on its own world")
    # The preset's own models and world (the user's --model, --bundle and --data are other suites' business).
    preset_ctx = dataclasses.replace(ctx, model=None, bundle=None, data=None)
    most = max(_questions_per_profile(ctx, p) for p in profiles)
    qs = fixtures.questions(preset_ctx, most)
    questions = {p: qs[:_questions_per_profile(ctx, p)] for p in profiles}
    model_rows = []
    for cut in CUTS:
        # Quick mode does not train the cut-2 models: times hardly depend on the weights, and the
        # answer length is capped either way.
        model_at = fixtures.untrained_model if ctx.quick and cut else fixtures.trained_model
        fp16 = fixtures.bundle_of(preset_ctx, model_at(preset_ctx, None, cut))
        two_bit = fixtures.bundle_of(preset_ctx, model_at(preset_ctx, 4, cut))
        ctx.echo(f"  link: cut {cut}, {', '.join(profiles)}")
        model_rows += _measure_bundle(ctx, fp16, cut, [("16-bit", False)], profiles, questions)
        model_rows += _measure_bundle(ctx, two_bit, cut, [("2-bit packed", False), ("2-bit entropy-coded", True)],
                                      profiles, questions)
    order = {(p, c, k): i for i, (p, c, k) in enumerate((p, c, k) for p in profiles for c in CUTS for k in FRAME_KINDS)}
    model_rows.sort(key=lambda r: order[r["profile"], r["cut"], r["frame"]])
    ctx.echo("  link: real-size frame sizes, no model")
    real_rows = _measure_real_size(ctx, profiles)
    head = _headline(model_rows, real_rows)
    plots = _plot(ctx, model_rows, real_rows, profiles)

    figures = {"profiles": {p: dataclasses.asdict(PROFILES[p]) for p in profiles},
               "preset": ctx.preset, "rows": model_rows, "real_size_rows": real_rows,
               "real_size_model": REAL_SIZE_MODEL, "real_size_bytes_up": REAL_SIZE_BYTES_UP,
               "headline": head}
    return Section("link", TITLE, _markdown(ctx, model_rows, real_rows, head, profiles, plots), figures, plots,
                   _headline_rows(head))


def _headline_rows(head: dict) -> list[tuple[str, str]]:
    rows = []
    p = head["profile"]
    tiny = head["tiny"]
    for key in ("cut0/2-bit packed", "cut0/2-bit entropy-coded"):
        if key in tiny:
            h = tiny[key]
            rows.append((f"{p}, tiny preset, cut 0, {key.split('/')[1]} vs 16-bit: time per answer",
                         f"{h['total_ms']:.0f} ms vs {h['total_ms_16bit']:.0f} ms "
                         f"(transfer speed-up {h['transfer_speedup']:.2f}x: tiny frames, delay-bound)"))
    for kind, h in head["real_size"].items():
        rows.append((f"{p}, real-size frame sizes ({REAL_SIZE_MODEL}, no model), {kind} vs 16-bit: transfer",
                     f"{h['transfer_ms']:.0f} ms vs {h['transfer_ms_16bit']:.0f} ms: {h['transfer_speedup']:.1f}x "
                     f"faster (goal >= {TRANSFER_GOAL:g}x: {'met' if h['meets_goal'] else 'not met'})"))
    return rows


def _markdown(ctx, model_rows, real_rows, head, profiles, plots) -> str:
    from edgeqtl.link import PROFILES

    fmt_bytes = lambda v: f"{v:,.0f}"  # noqa: E731
    quick_note = (f"quick mode: cut 0 models trained {fixtures.QUICK_TRAIN['steps']} steps, cut 2 models untrained, "
                  "answers of at most 4 tokens")
    lines = [
        "Each answer's wall time on the device, split three ways. **Device**: the client's ONNX graphs and "
        "frame building (prefill, each decode step, packing or entropy coding), timed around "
        "`DeviceClient.encode`, `encode_token` and `frame`. **Server**: the agent's `handle_batch` (frame "
        "decoding, the server half's passes, the reply), timed on its worker thread. **Transfer**: the rest, "
        "i.e. time on the shaped link and waiting for it, plus paho's and mosquitto's own time on loopback. "
        "Medians over the questions of each row, each part on its own (total = the sum of the three "
        "medians; the measured median total is in the JSON). Every row has its own relay and MQTT connection "
        "and one untimed warm-up question; no retries. The relay, the agent and the device client share one "
        "process (and the machine's cores): on a busy machine the scheduling delays land in the transfer "
        "column, so it is an upper bound.",
        "",
        f"Setup: mosquitto on loopback, a server agent in this process connected to it directly, an "
        f"`edgeqtl.link` relay in front of it, the device client connected through the relay. Models: the "
        f"{ctx.preset} preset trained here at 16 bits and at 2 bits (4 levels), cut 0 and cut 2 "
        f"({quick_note if ctx.quick else 'answers of at most 8 tokens'}"
        f"). At cut 2 every generated token is a round trip (the round-trips column).",
        "",
        "Links: " + "; ".join(PROFILES[p].describe() for p in profiles) + ".",
        "",
        "What the relay emulates: per connection and direction, a bottleneck of the given rate followed by a "
        "pipe of the given one-way delay (and jitter, 0 here), with a bounded queue and TCP back-pressure. "
        "What it does not: loss or reordering (TCP on both sides; a lossy radio appears only as delay), TCP's own "
        "slow start and retransmits on the slow link (TCP over TCP), sharing the link between devices, and the "
        "radio's state machine (NB-IoT/LTE-M paging, PSM, eDRX wake-up).",
        "",
        "### The tiny preset, end to end",
        "",
        "Frame bytes up: every frame the device sent, headers included (the client's own count). TCP bytes: "
        "what the relay carried per question each way, MQTT included (publish headers, topics, acknowledgements).",
        "",
    ]
    header = ["profile", "cut", "frame", "frame bytes up", "TCP bytes up", "TCP bytes down", "round trips",
              "device ms", "transfer ms", "server ms", "total ms"]
    lines.append(markdown_table(header, [
        [r["profile"], r["cut"], r["frame"], fmt_bytes(r["bytes_up"]), fmt_bytes(r["tcp_bytes_up"]),
         fmt_bytes(r["tcp_bytes_down"]), f"{r['round_trips']:g}", r["device_ms"], r["transfer_ms"], r["server_ms"],
         r["total_ms"]] for r in model_rows]))
    reply = real_rows[0]["bytes_down"] if real_rows else 0
    lines += [
        "",
        f"![time per answer]({plots[0].name})",
        "",
        "### Transfer of real-size frame sizes, no model",
        "",
        f"The tiny preset's frames are smaller than one round trip of a 4G link, so its transfer is mostly delay. "
        f"These rows send payloads of exactly the request sizes measured for {REAL_SIZE_MODEL} (cut 0, 2 bits; "
        f"README, \"Bring your own checkpoint\"; the entropy-coded size is of random weights) through the same "
        f"relay to an MQTT echo on the broker, which replies at once with {reply} B (an ANSWER frame of 8 "
        f"tokens); the time is request to reply. No model runs: device and server compute are not part of "
        f"these rows. Link model: serialization each way plus the two one-way delays, for comparison.",
        "",
        markdown_table(["profile", "cut", "frame (real-size bytes, no model)", "bytes up", "bytes down",
                        "TCP bytes up", "repeats", "transfer ms", "link model ms"],
                       [[r["profile"], r["cut"], r["frame"], fmt_bytes(r["bytes_up"]), fmt_bytes(r["bytes_down"]),
                         fmt_bytes(r["tcp_bytes_up"]), r["repeats"], r["transfer_ms"], r["link_model_ms"]]
                        for r in real_rows]),
        "",
        f"![real-size transfer]({plots[1].name})",
        "",
        f"### At {head['profile']}",
        "",
    ]
    rows = []
    for key, h in head["tiny"].items():
        cut, kind = key.split("/")
        rows.append([f"tiny, {cut.replace('cut', 'cut ')}", kind, h["total_ms"], h["total_ms_16bit"],
                     h["transfer_ms"], h["transfer_ms_16bit"], f"{h['transfer_speedup']:.2f}x"])
    for kind, h in head["real_size"].items():
        rows.append(["real-size frame sizes, no model, cut 0", kind, float("nan"), float("nan"), h["transfer_ms"],
                     h["transfer_ms_16bit"], f"{h['transfer_speedup']:.2f}x"])
    lines.append(markdown_table(["frames", "2-bit frame", "answer ms", "16-bit answer ms", "transfer ms",
                                 "16-bit transfer ms", "transfer speed-up"], rows))
    lines += ["", f"Goal: 2-bit frames transfer >= {TRANSFER_GOAL:g}x faster than 16-bit. The tiny frames cannot "
              "show it (delay dominates); the real-size frame sizes are where it applies."]
    if ctx.quick:
        lines += ["", f"Quick mode: 4g and wifi only, 5 questions a row, {quick_note}: figures for a smoke test. "
                  "The machine may be shared: times are upper bounds."]
    return "\n".join(lines)
