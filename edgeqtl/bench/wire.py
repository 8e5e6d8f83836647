"""The `wire` suite: bytes up and down per question and per split-training step, frames
whole (headers included), against the same frames carrying 16-bit values.

Per question: the device client asks over a real mosquitto through an unshaped link
relay, once with plainly packed codes and once entropy-coded; the frames' bytes come
from the client (every frame it sends, headers included), the TCP bytes both ways from
the relay (MQTT's own headers, topics and acknowledgements on top). Per training step:
a device trainer and the training service exchange real frames in one process, for each
gradient codec. Bits per element (the headline rate figure): all the bits of a request,
headers included, over (sequence positions x the hidden size at the cut).
"""
from __future__ import annotations

import math
import statistics

from edgeqtl.bundle import BundleManifest

from . import fixtures
from .report import BenchContext, Section, markdown_table, new_figure, save_figure

TITLE = "Bytes on the wire per question and per training step"


def _per_question(ctx: BenchContext, bundle, n: int, name: str | None = None) -> list[dict]:
    """name: the row's label (default: how the frames are coded)."""
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.link import LinkProfile, LinkRelay
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    qs = fixtures.questions(ctx, n)
    engine = load_engine(bundle / "server", max_new_tokens=4 if ctx.quick else 16)
    rows = []
    with MosquittoBroker() as broker:
        with ServerAgent(engine, BrokerConfig(port=broker.port)):
            for label, entropy in (("packed", False), ("entropy-coded", True)):
                client = DeviceClient(bundle, entropy=entropy)
                if entropy and (client.entropy is None or name is not None):
                    continue  # a 16-bit bundle has no codes to entropy-code; a named row is packing alone
                relay = LinkRelay("127.0.0.1", 0, "127.0.0.1", broker.port,
                                  LinkProfile("unshaped", up=math.inf, down=math.inf, delay=0.0)).start()
                try:
                    with RequestClient(BrokerConfig(port=relay.port), f"bench-wire-{label}") as t:
                        up0, down0 = relay.bytes_up, relay.bytes_down  # the connection's own handshake apart
                        answers = [client.ask(t, q.image, q.question, timeout=60) for q in qs]
                        tcp_up, tcp_down = relay.bytes_up - up0, relay.bytes_down - down0
                finally:
                    relay.stop()
                m = client.manifest
                # positions sent: the prompt's, plus one per decode step at cut > 0 (its frames count too)
                positions = [client.prompts.encode([q.question])[0].shape[1] + (a.round_trips - 1 if m.cut else 0)
                             for q, a in zip(qs, answers)]
                rows.append({
                    "frames": name or (label if m.quantizer == "fsq" else "16-bit"), "quantizer": m.quantizer,
                    "prompt_ids": m.prompt_ids,
                    "levels": m.levels, "cut": m.cut, "questions": len(qs),
                    "bytes_up": statistics.mean(a.bytes_up for a in answers),
                    "bytes_up_16bit": statistics.mean(a.bytes_up_fp16 for a in answers),
                    "tcp_bytes_up": tcp_up / len(qs), "tcp_bytes_down": tcp_down / len(qs),
                    "round_trips": statistics.mean(a.round_trips for a in answers),
                    "hidden_size": m.hidden_size, "code_dim": m.code_dim,
                    "positions": statistics.mean(positions)})
    for r in rows:
        r["saved_vs_16bit"] = 1 - r["bytes_up"] / r["bytes_up_16bit"]
    return rows


def _per_training_step(ctx: BenchContext, model_dir, steps: int) -> list[dict]:
    import dataclasses

    from edgeqtl.codec.gradient import GRADIENT_CODECS
    from edgeqtl.device_agent.links import LocalLink
    from edgeqtl.models.device_training import DeviceTrainer
    from edgeqtl.models.batches import Collator, image_spec_of
    from edgeqtl.models.load import load_prompts, load_split_model, world_of
    from edgeqtl.models.split import fingerprint
    from edgeqtl.models.steps import SplitTrainConfig
    from edgeqtl.server_agent.training import TrainingService

    world = world_of(model_dir)
    rows = []
    for codec in GRADIENT_CODECS:
        cfg = dataclasses.replace(SplitTrainConfig(), grad_codec=codec, steps=steps, batch_size=8 if ctx.quick else 32)
        base = load_split_model(model_dir)
        fp = bytes.fromhex(fingerprint(base))[:16]
        service = TrainingService(base, cfg, num_devices=1, fingerprint=fp)
        model = load_split_model(model_dir)
        collate = Collator(load_prompts(model_dir, model), image_spec_of(model))
        trainer = DeviceTrainer(model, lambda step: collate(world.train_batch(cfg.seed, step, cfg.batch_size)), cfg,
                                f"bench-wire-{codec}", fingerprint=fp)
        link = LocalLink(service)
        for step in range(1, steps + 1):
            trainer.train_step(step, link)
        rows.append({"gradient_codec": codec, "batch_size": cfg.batch_size, "steps": steps,
                     "levels": model.split.levels if model.split.quantizer == "fsq" else None,
                     "bytes_up": trainer.bytes_up / steps, "bytes_down": trainer.bytes_down / steps,
                     "bytes_up_16bit": trainer.fp16_up / steps, "bytes_down_16bit": trainer.fp16_down / steps})
    for r in rows:
        r["saved_vs_16bit"] = 1 - (r["bytes_up"] + r["bytes_down"]) / (r["bytes_up_16bit"] + r["bytes_down_16bit"])
    return rows


def _against_tokens(model_dir, qs) -> list[dict]:
    """Bytes per question for K = 1, 1/2, ... 1/16 of the image tokens (divprune choosing,
    the trained quantizer), built as the device builds them: models.rate.bytes_against_tokens.
    The first half of the questions fits the entropy model, the second is measured."""
    import dataclasses

    from edgeqtl.export.calibration import Sample
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.models.rate import bytes_against_tokens

    model = load_split_model(model_dir).eval()
    if model.split.quantizer != "fsq":
        return []
    samples = [Sample(q.image, q.question, q.answer) for q in qs]
    half = len(samples) // 2
    rows = bytes_against_tokens(model, samples[:half], samples[half:], load_prompts(model_dir, model),
                                image_spec_of(model), prompt_ids=model.split.cut == 0)
    return [dataclasses.asdict(r) for r in rows if not r.note]


def run(ctx: BenchContext) -> Section:
    n = 14 if ctx.quick else 140
    model_dir = fixtures.the_model(ctx, 4)
    bundle = fixtures.bundle_of(ctx, model_dir)
    q_rows = _per_question(ctx, bundle, n)
    if BundleManifest.load(bundle).prompt_ids:  # the same model with its prompt as codes, for comparison
        q_rows += _per_question(ctx, fixtures.bundle_of(ctx, model_dir, prompt_ids=False), n,
                                name="packed, prompt as codes")
    if ctx.model is None:  # 16-bit hidden states at every position: what a split without edgeqtl's coding sends
        q_rows += _per_question(ctx, fixtures.bundle_of(ctx, fixtures.trained_model(ctx, None), prompt_ids=False), n)
    for r in q_rows:  # bits per element: whole frames over positions x hidden size
        r["bits_per_element"] = 8 * r["bytes_up"] / (r["positions"] * r["hidden_size"])
    k_rows = _against_tokens(model_dir, fixtures.questions(ctx, n))
    t_rows = _per_training_step(ctx, model_dir, 3 if ctx.quick else 20)

    fig, ax = new_figure()
    labels = [f"{r['frames']}\ncut {r['cut']}" for r in q_rows]
    ax.bar(labels, [r["bytes_up"] for r in q_rows], label="frames up (headers included)")
    ax.bar(labels, [r["tcp_bytes_down"] for r in q_rows], bottom=[r["bytes_up"] for r in q_rows], alpha=0.6,
           label="TCP down (answer, MQTT included)")
    ax.set_ylabel("bytes per question")
    ax.set_title("bytes per question")
    ax.legend(fontsize=8)
    plot = save_figure(fig, ctx.path("wire.png"))

    q_table = markdown_table(
        ["frames", "cut", "bytes up (frames)", "same as 16-bit", "saved", "bits/element", "TCP up", "TCP down",
         "round trips"],
        [[r["frames"], r["cut"], r["bytes_up"], r["bytes_up_16bit"], f"{100 * r['saved_vs_16bit']:.2f}%",
          r["bits_per_element"], r["tcp_bytes_up"], r["tcp_bytes_down"], r["round_trips"]] for r in q_rows])
    t_table = markdown_table(
        ["gradient codec", "batch", "bytes up", "bytes down", "16-bit up", "16-bit down", "saved (both ways)"],
        [[r["gradient_codec"], r["batch_size"], r["bytes_up"], r["bytes_down"], r["bytes_up_16bit"],
          r["bytes_down_16bit"], f"{100 * r['saved_vs_16bit']:.1f}%"] for r in t_rows])
    k_table = markdown_table(["image tokens K", "code positions", "bytes up, packed", "bytes up, entropy-coded",
                              "16-bit, every image token", "saved"],
                             [[r["tokens"], r["positions"], r["packed"], r["rans"], r["fp16"],
                               f"{100 * (1 - r['rans'] / r['fp16']):.2f}%"] for r in k_rows])
    markdown = (f"Per question ({n} held-out questions, means; `{model_dir}`):\n\n{q_table}\n\n"
                f"![bytes per question]({plot.name})\n\n"
                "\"Same as 16-bit\" is the same frames carrying 16-bit hidden states (headers included); bits per "
                "element are the frames' bits over prompt positions times the hidden size at the cut. TCP bytes are "
                "counted by a relay between the device and the broker: they add MQTT's headers, the topic names and "
                "the acknowledgements, and downlink is the answer frame. With the prompt as codes, plain 2-bit packing "
                "is 12.5% of the 16-bit payload, so with headers those frames save slightly less than 87.5%; at cut 0 "
                "the default sends the prompt's text as token ids (4 bytes each) and only the image positions as "
                "codes, which passes it, and entropy coding can pass it when the codes are skewed.\n\n"
                f"Bytes per question against K, the image tokens kept (divprune, the trained quantizer unchanged; "
                f"frames built and encoded as the device does, in one process):\n\n{k_table}\n\n"
                f"Per split-training step (in one process, real frames, {t_rows[0]['steps']} steps):\n\n{t_table}\n")
    headline = [(f"uplink per question, {r['frames']}, cut {r['cut']}",
                 f"{r['bytes_up']:,.0f} B ({100 * r['saved_vs_16bit']:.1f}% below 16-bit)") for r in q_rows
                if r["frames"] != "16-bit"]
    headline += [(f"per training step, {r['gradient_codec']} gradients",
                  f"{r['bytes_up'] + r['bytes_down']:,.0f} B both ways ({100 * r['saved_vs_16bit']:.1f}% below 16-bit)")
                 for r in t_rows]
    return Section("wire", TITLE, markdown, {"per_question": q_rows, "against_image_tokens": k_rows,
                                                      "per_training_step": t_rows}, [plot], headline)
