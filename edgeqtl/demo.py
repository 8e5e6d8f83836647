"""`edgeqtl demo`: the whole chain on one machine, on a built-in preset.

    1. train the preset with 2-bit codes at cut 0 (cached in the workdir)
    2. export and verify a device bundle (cached)
    3. start a broker: mosquitto if installed, else the embedded amqtt
    4. start a server agent and a torch-free device client, and ask held-out questions

What the tiny model (the default) knows: the shapes world of edgeqtl.shapes, and nothing
else. Its images are 64x64, black, with up to four coloured shapes (circle, square,
triangle, diamond, cross in red, green, blue, yellow, magenta, cyan), one per cell of a
2x2 grid, and its 44-word vocabulary covers colour, shape, count, position and "left of"
questions about them. A photograph, or a red circle on white, is outside that world and
gets a wrong answer. The small preset (--preset small) knows the scenes world
(edgeqtl.scenes): 128 px images of 0-9 objects over photographs and textures.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

# Training steps when none are given: the tiny preset's demo (a few minutes on 2 cores),
# the small preset's shortened benchmark run (about half an hour on 2 cores).
DEMO_STEPS = {"tiny": 2000, "small": 1500}


def run_demo(workdir: Path, steps: int | None = None, questions: int = 100, retrain: bool = False,
             echo: Callable[[str], None] = print, preset: str = "tiny") -> dict:
    """Returns the figures it prints: accuracy, bytes per question, median latency."""
    from PIL import Image

    from edgeqtl.broker import MosquittoBroker, start_broker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.presets import build_preset, get_preset
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.training import train as run_training
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient
    from edgeqtl.worlds import get_world

    spec = get_preset(preset)
    world = get_world(spec.world)
    steps = steps or DEMO_STEPS[preset]
    if preset != "tiny":  # the tiny preset keeps the cache paths it always had
        workdir = workdir / preset
    model_dir, bundle_dir = workdir / "model", workdir / "bundle"
    if retrain or not (model_dir / "edgeqtl_split.json").is_file():
        for d in (model_dir, bundle_dir):
            if d.exists():
                shutil.rmtree(d)
        echo(f"1/4 training the {preset} model, 2-bit codes at cut 0, {steps} steps -> {model_dir}")
        base = spec.train_config()
        cfg = dataclasses.replace(base, steps=steps, curriculum_steps=min(base.curriculum_steps, steps // 3),
                                  vision_steps=min(base.vision_steps, steps // 5))
        model = SplitModel(build_preset(spec, 0), SplitConfig(cut=0, levels=4))
        run_training(model, WorldSource.for_model(model, cfg, world), cfg, out_dir=model_dir)
    else:
        echo(f"1/4 using the trained model cached in {model_dir} (--retrain to train again)")
    if (bundle_dir / "manifest.json").is_file():
        echo(f"2/4 using the device bundle cached in {bundle_dir}")
    else:
        echo(f"2/4 exporting and verifying the device bundle -> {bundle_dir}")
        res = export_bundle(ExportOptions(model_dir, bundle_dir, verify_per_family=20), progress=None)
        echo(res.verification.table())

    samples = world.heldout(max(1, questions // len(world.FAMILIES)))
    example = workdir / "example-question.png"
    Image.fromarray(samples[0].image).save(example)
    broker = start_broker()
    mosquitto = isinstance(broker, MosquittoBroker)
    echo(f"3/4 broker: {'mosquitto' if mosquitto else 'embedded amqtt'} on {broker.url}")
    try:
        cfg = BrokerConfig.from_url(broker.url)
        engine = load_engine(bundle_dir / "server")
        with ServerAgent(engine, cfg, group="edgeqtl-servers" if mosquitto else None), \
                RequestClient(cfg, "demo-device") as transport:
            client = DeviceClient(bundle_dir)
            echo(f"4/4 the device asks {len(samples)} held-out questions through the broker; the first one's "
                 f"image is {example}")
            right, up, fp16, lat = 0, 0, 0, []
            for i, s in enumerate(samples):
                a = client.ask(transport, s.image, s.question)
                ok = world.answer_word(a.text) == s.answer
                right += ok
                up, fp16 = up + a.bytes_up, fp16 + a.bytes_up_fp16
                lat.append(a.latency_s)
                if i % max(1, len(samples) // 8) == 0:
                    echo(f"   {s.question:<52} -> {a.text:<10} ({'right' if ok else 'wrong, ' + s.answer})")
    finally:
        broker.stop()
    n = len(samples)
    figures = {"accuracy": right / n, "questions": n, "bytes_up": up / n, "bytes_up_fp16": fp16 / n,
               "median_latency_ms": 1e3 * sorted(lat)[n // 2]}
    echo(f"held-out accuracy over the broker: {100 * right / n:.1f}% of {n}")
    echo(f"uplink: {up / n:.0f} B per question (frames, headers included) vs {fp16 / n:.0f} B as 16-bit "
         f"hidden states: {100 * (1 - up / fp16):.1f}% saved; median latency {figures['median_latency_ms']:.1f} ms")
    return figures
