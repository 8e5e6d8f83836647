"""The `edgeqtl` command line. Torch is imported inside the commands that need it, so
that `import edgeqtl` and the device commands stay torch-free."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__


class UserError(click.ClickException):
    """One clear line for a mistake the user can fix; never a traceback."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def user_errors(fn):
    """Turn the errors a user can cause into one line (what, and how to fix it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (FileNotFoundError, PermissionError) as e:
            raise UserError(str(e)) from None
        except ValueError as e:  # CheckpointError, UnsupportedModelError, ImageError, ... are ValueErrors
            raise UserError(str(e)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeqtl")
def main():
    """edgeqtl: split a vision-language model between an edge device and a server.

    \b
    Quick start (the built-in tiny model on the shapes benchmark):
      edgeqtl train --preset tiny --bits 2 --out runs/tiny-2bit
      edgeqtl eval --model runs/tiny-2bit
    """


def _split_options(fn):
    fn = click.option("--cut", type=int, default=0, show_default=True,
                      help="Decoder layers that run on the device (0 <= cut < layers).")(fn)
    fn = click.option("--bits", type=click.IntRange(1, 8), default=None,
                      help="Code bits per symbol: levels = 2**bits. Default 2.")(fn)
    fn = click.option("--levels", type=click.IntRange(2, 256), default=None,
                      help="Quantizer levels, any L >= 2 (e.g. 3 = 1.58 bits).")(fn)
    fn = click.option("--baseline", is_flag=True,
                      help="No quantizer: send 16-bit hidden states (the unquantized baseline).")(fn)
    return fn


def split_config_from(cut: int, bits: int | None, levels: int | None, baseline: bool,
                      clip_sigmas: float | None = None):
    from edgeqtl.models.split import SplitConfig  # torch

    if bits is not None and levels is not None and levels != 2 ** bits:
        raise UserError(f"--bits {bits} means {2 ** bits} levels but --levels {levels} was given; pass one of them")
    if baseline:
        if bits is not None or levels is not None:
            raise UserError("--baseline sends 16-bit hidden states; drop --bits/--levels")
        return SplitConfig(cut=cut, quantizer="fp16")
    return SplitConfig(cut=cut, quantizer="fsq", levels=levels or 2 ** (bits if bits is not None else 2),
                       clip_sigmas=clip_sigmas)


@main.command()
@click.option("--preset", type=click.Choice(["tiny"]), default="tiny", show_default=True,
              help="Built-in model built from config (used when --model is not given).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A local HF Llava checkpoint directory (safetensors) to start from instead.")
@_split_options
@click.option("--steps", type=int, default=None, help="End-to-end training steps (stage 2).")
@click.option("--vision-steps", type=int, default=None, help="Vision alignment steps (stage 1); 0 skips it.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--clip-sigmas", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Quantizer normalisation range in sigmas (default: Gaussian-optimal for the levels, "
                   "1.49 at 2 bits; DESIGN.md's 3.0 is the old default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Save every N steps (0: at the end).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the trained split model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train(preset, model_dir, cut, bits, levels, baseline, steps, vision_steps, batch_size, lr, clip_sigmas, seed,
          threads, checkpoint_every, out, quiet):
    """Train both halves of a split model on the shapes benchmark, in one process.

    Every step passes integer codes from the client half to the server half and the
    gradient back, exactly as the wire will.

    \b
    Example:
      edgeqtl train --preset tiny --cut 0 --bits 2 --out runs/tiny-2bit
      edgeqtl train --preset tiny --baseline --out runs/tiny-fp16
    """
    import dataclasses

    import torch

    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitModel
    from edgeqtl.models.training import TrainConfig, evaluate, ShapesCollator, image_spec_of
    from edgeqtl.models.training import train as run_training

    if threads:
        torch.set_num_threads(threads)
    split = split_config_from(cut, bits, levels, baseline, clip_sigmas)
    if model_dir is not None:
        model = load_split_model(model_dir, split)
        tokenizer = load_tokenizer(model_dir)
    else:
        model = SplitModel(build_tiny(seed), split)
        tokenizer = shapes.build_tokenizer()
    overrides = {k: v for k, v in dict(steps=steps, vision_steps=vision_steps, batch_size=batch_size, lr=lr).items()
                 if v is not None}
    if model_dir is not None and vision_steps is None:
        overrides["vision_steps"] = 0  # a real checkpoint's vision tower is pretrained
    cfg = dataclasses.replace(TrainConfig(seed=seed, checkpoint_every=checkpoint_every), **overrides)
    click.echo(f"training {'tiny' if model_dir is None else model_dir} split at cut {model.split.cut}, "
               f"{_describe(model.split)}, {cfg.steps} steps -> {out}")
    run_training(model, tokenizer, cfg, out_dir=out, progress=not quiet)
    report = evaluate(model, ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model)),
                      shapes.heldout(100))
    click.echo(report.table("quick held-out check (100 per family; `edgeqtl eval` runs the full set):"))
    click.echo(f"saved to {out}")


def _describe(split) -> str:
    if split.quantizer == "fsq":
        return f"{split.levels} levels ({split.bits_per_symbol:.2f} bits)"
    return "16-bit baseline" if split.quantizer == "fp16" else "identity"


def load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory} has no tokenizer.json; save the tokenizer beside the checkpoint")
    return Tokenizer.from_file(str(path))


@main.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model directory (from `edgeqtl train`).")
@click.option("--per-family", type=int, default=500, show_default=True, help="Held-out questions per family.")
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@user_errors
def evaluate_cmd(model_dir, per_family, threads, json_out):
    """Held-out accuracy per task family, and the bits per sample the client sends
    next to the unquantized 16-bit baseline.

    \b
    Example:
      edgeqtl eval --model runs/tiny-2bit --per-family 500
    """
    import torch

    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.training import ShapesCollator, evaluate, image_spec_of

    if threads:
        torch.set_num_threads(threads)
    model = load_split_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    report = evaluate(model, ShapesCollator(tokenizer, model.num_image_tokens, image_spec_of(model)),
                      shapes.heldout(per_family))
    click.echo(report.table(f"{model_dir}: cut {model.split.cut}, {_describe(model.split)}, "
                            f"{report.n} held-out questions"))
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="A trained split model (from `edgeqtl train`) or a local HF Llava checkpoint.")
@click.option("--cut", type=int, default=None, help="Only for a plain checkpoint; a trained model keeps its own.")
@click.option("--bits", type=click.IntRange(1, 8), default=None, help="Levels = 2**bits (plain checkpoints).")
@click.option("--levels", type=click.IntRange(2, 256), default=None, help="Any L >= 2 (plain checkpoints).")
@click.option("--target", type=click.Choice(["cpu", "arm64", "jetson"]), default="cpu", show_default=True,
              help="cpu/arm64: fp32 + int8 graphs; jetson: fp16 graph for the CUDA/TensorRT providers.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch on held-out questions; exit 1 if a threshold fails.")
@click.option("--verify-per-family", type=int, default=100, show_default=True)
@user_errors
def export(model_dir, cut, bits, levels, target, out, verify, verify_per_family):
    """Compile the client half into an ONNX device bundle, plus the server half.

    \b
    Example:
      edgeqtl export --model runs/tiny-2bit --target arm64 --out bundles/tiny-pi
      edgeqtl export --model ./llava-ckpt --cut 4 --bits 2 --target jetson --out bundles/jetson
    """
    from edgeqtl.export.bundle import ExportOptions, export_bundle

    if bits is not None and levels is not None and levels != 2 ** bits:
        raise UserError(f"--bits {bits} means {2 ** bits} levels but --levels {levels} was given; pass one of them")
    lv = levels or (2 ** bits if bits is not None else None)
    res = export_bundle(ExportOptions(model_dir, out, cut, lv, target, verify, verify_per_family), progress=click.echo)
    m = res.manifest
    click.echo(f"bundle {out}: cut {m.cut}, {m.quantizer} {m.levels if m.quantizer == 'fsq' else ''} levels, "
               f"target {m.target}, fingerprint {m.fingerprint[:16]}, {res.seconds:.1f} s")
    for name, size in res.files.items():
        click.echo(f"  {size / 1024:10.1f} KiB  {name}")
    if res.verification is not None:
        click.echo(res.verification.table())
        if not res.verification.ok:
            raise UserError("verification failed: the bundle does not reproduce the PyTorch client (table above)")


@main.command()
@click.option("--port", type=int, default=1883, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--max-packet-size", type=int, default=None, help="Advertised to MQTT 5 clients in CONNACK.")
@user_errors
def broker(port, host, max_packet_size):
    """Run a local MQTT broker for demos and tests: mosquitto when installed (MQTT 5,
    shared subscriptions), from a generated config with TCP_NODELAY on; otherwise the
    embedded amqtt broker (MQTT 3.1.1, one server agent, `pip install edgeqtl[demo]`).

    For production use your own mosquitto with TLS and ACLs (docs/PROTOCOL.md).

    \b
    Example:
      edgeqtl broker --port 1883
    """
    import time

    from edgeqtl.broker import BrokerStartError, MosquittoBroker, start_broker

    try:
        b = start_broker(port=port, host=host, max_packet_size=max_packet_size)
    except BrokerStartError as e:
        raise UserError(str(e)) from None
    name = "mosquitto" if isinstance(b, MosquittoBroker) else "embedded amqtt (MQTT 3.1.1, no shared subscriptions)"
    click.echo(f"{name} listening on {b.url} (Ctrl-C to stop)")
    try:
        while getattr(b, "proc", None) is None or b.proc.poll() is None:
            time.sleep(0.5)
        raise UserError(f"mosquitto exited with code {b.proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


def _broker_options(fn):
    fn = click.option("--broker", "broker_url", default="mqtt://127.0.0.1:1883", show_default=True,
                      help="mqtt://[user:pass@]host[:port] or mqtts://...; add ?protocol=3.1.1 for old brokers.")(fn)
    fn = click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="CA certificate for mqtts://.")(fn)
    fn = click.option("--cert-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Client certificate (mutual TLS).")(fn)
    fn = click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Client certificate's key.")(fn)
    return fn


def _broker_config(broker_url, ca_file, cert_file, key_file):
    from edgeqtl.transport import BrokerConfig

    return BrokerConfig.from_url(broker_url, ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def _transport_errors(fn):
    """Transport failures (dead broker, timeouts, refusals) as one line too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgeqtl.transport import TransportError

        try:
            return fn(*args, **kwargs)
        except TransportError as e:  # ServerError (an ERROR frame) is one too
            raise UserError(str(e)) from None

    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _split_train_options(fn):
    """What the server and the devices of one split-training run must agree on."""
    fn = click.option("--steps", type=int, default=1000, show_default=True, help="Training steps per device.")(fn)
    fn = click.option("--batch-size", type=int, default=32, show_default=True)(fn)
    fn = click.option("--lr", type=float, default=3e-3, show_default=True)(fn)
    fn = click.option("--checkpoint-every", type=int, default=100, show_default=True,
                      help="Checkpoint every N steps (the server: N steps of all devices together).")(fn)
    fn = click.option("--fedavg-every", type=int, default=0, show_default=True,
                      help="Average the devices' trainable weights through the server every R steps (0: off).")(fn)
    fn = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Checkpoints (and the server's write-ahead log): restart with the same directory to resume.")(fn)
    fn = click.option("--threads", type=int, default=None)(fn)
    return fn


@main.command()
@click.option("--server-half", type=click.Path(path_type=Path), default=None,
              help="The server/ directory of an exported bundle (inference).")
@_broker_options
@click.option("--group", default="edgeqtl-servers", show_default=True,
              help="Shared-subscription group: agents in one group split the requests.")
@click.option("--no-shared", is_flag=True, help="Plain subscription, for brokers without $share (amqtt).")
@click.option("--device", "torch_device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests waiting together are answered in one batch of at most this many (1: one at a time).")
@click.option("--train", is_flag=True, help="Split training instead of inference: train the trunk of --model.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="With --train: the split model both sides start from.")
@click.option("--devices", "num_devices", type=int, default=1, show_default=True,
              help="With --train: how many devices train (the federated average waits for all of them).")
@click.option("--grad-codec", type=click.Choice(["fp16", "int8", "int4"]), default="int8", show_default=True,
              help="With --train: how gradients go back (int4: unbiased stochastic rounding).")
@_split_train_options
@user_errors
@_transport_errors
def server(server_half, broker_url, ca_file, cert_file, key_file, group, no_shared, torch_device, max_new_tokens,
           max_batch, train, model_dir, num_devices, grad_codec, steps, batch_size, lr, checkpoint_every,
           fedavg_every, state_dir, threads):
    """Run a server agent: answers devices' requests with the server half, or, with
    --train, trains the trunk of a split model for devices that keep their data.

    \b
    Examples:
      edgeqtl server --server-half bundles/pi/server --broker mqtt://broker.lan:1883
      edgeqtl server --train --model runs/tiny-2bit --devices 2 --state-dir runs/srv --broker mqtt://broker.lan
    """
    import signal

    import torch

    if threads:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C: state saved, connection closed
    cfg = _broker_config(broker_url, ca_file, cert_file, key_file)
    if train:
        if model_dir is None:
            raise UserError("--train needs --model, the split model both sides start from")
        from edgeqtl.models.load import load_split_model
        from edgeqtl.models.split import fingerprint
        from edgeqtl.models.split_training import ServerTrainer, SplitTrainConfig
        from edgeqtl.transport import Responder

        model = load_split_model(model_dir)
        tcfg = SplitTrainConfig(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                                fedavg_every=fedavg_every, grad_codec=grad_codec)
        trainer = ServerTrainer(model, tcfg, state_dir, num_devices, bytes.fromhex(fingerprint(model))[:16])
        agent = Responder(cfg, trainer.handle_batch, group=None if no_shared else group).start()
        click.echo(f"training server on {cfg.describe()}: {num_devices} device(s), {grad_codec} gradients, "
                   f"resuming at {trainer.server_steps} steps (Ctrl-C to stop)", err=True)

        def stop_training():
            agent.stop()
            if state_dir is not None:
                trainer.save()
            trainer.close()
            click.echo(f"stopped after {trainer.server_steps} steps: " +
                       json.dumps({k: len(v) for k, v in trainer.applied.items()}), err=True)

        _serve_until_interrupted(stop_training)
        return
    if server_half is None:
        raise UserError("give --server-half (inference) or --train --model (split training)")
    from edgeqtl.server_agent.agent import ServerAgent, describe, load_engine

    engine = load_engine(server_half, max_new_tokens=max_new_tokens, device=torch_device)
    agent = ServerAgent(engine, cfg, group=None if no_shared else group, max_batch=max_batch).start()
    click.echo(f"server agent on {cfg.describe()}: {describe(engine)} (Ctrl-C to stop)", err=True)

    def stop_serving():
        agent.stop()
        click.echo(f"stopped: {json.dumps(agent.stats())}", err=True)

    _serve_until_interrupted(stop_serving)


def _serve_until_interrupted(stop) -> None:
    """Block until Ctrl-C or SIGTERM, then `stop()`."""
    import time

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


@main.group()
def device():
    """The device agent (no torch): ask questions with a bundle over MQTT."""


@device.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="An exported bundle directory.")
@_broker_options
@click.option("--image", type=click.Path(path_type=Path), required=True)
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--device-id", default=None, help="This device's id (default: host name).")
@click.option("--variant", type=click.Choice(["fp32", "int8", "fp16"]), default=None,
              help="Which client graph (default: the bundle's first).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per try.")
@user_errors
@_transport_errors
def ask(bundle, broker_url, ca_file, cert_file, key_file, image, prompt, device_id, variant, timeout):
    """Ask one question about one image; prints the answer, latency and bytes sent.

    \b
    Example:
      edgeqtl device ask --bundle bundles/pi --broker mqtt://broker.lan \\
          --image photo.png --prompt "what color is the circle ?"
    """
    import socket as _socket

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.transport import RequestClient

    client = DeviceClient(bundle, variant)
    dev_id = device_id or _socket.gethostname().split(".")[0]
    with RequestClient(_broker_config(broker_url, ca_file, cert_file, key_file), dev_id) as transport:
        a = client.ask(transport, image, prompt, timeout=timeout)
    click.echo(a.text)
    click.echo(f"latency {1e3 * a.latency_s:.1f} ms, {a.round_trips} round trip(s), sent {a.bytes_up} B "
               f"(16-bit hidden states: {a.bytes_up_fp16} B, {100 * (1 - a.bytes_up / a.bytes_up_fp16):.1f}% saved)",
               err=True)


@device.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="An exported bundle directory.")
@_broker_options
@click.option("--jobs", type=click.File("r"), default="-", show_default=True,
              help="A JSON-lines file of jobs ('-': standard input).")
@click.option("--watch", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Instead of --jobs: answer every *.jsonl dropped into this folder (answers/ and done/ beside).")
@click.option("--out", type=click.File("a"), default="-", show_default=True,
              help="Where answers go as JSON lines with --jobs ('-': standard output).")
@click.option("--device-id", default=None, help="This device's id (default: host name).")
@click.option("--variant", type=click.Choice(["fp32", "int8", "fp16"]), default=None,
              help="Which client graph (default: the bundle's first).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per try.")
@click.option("--give-up", type=float, default=None,
              help="Seconds a job may wait for the broker and a server before it gets an error line "
                   "(default: wait for ever).")
@user_errors
@_transport_errors
def run(bundle, broker_url, ca_file, cert_file, key_file, jobs, watch, out, device_id, variant, timeout, give_up):
    """Run the device agent unattended: jobs in, answers out, as JSON lines.

    A job is {"id": ..., "image": PATH, "prompt": TEXT}; each gets one answer line
    {"id": ..., "answer": ..., "latency_ms": ..., "bytes_up": ...} or {"id": ..., "error": ...}.
    Broker restarts are ridden out: jobs wait and retry, nothing is lost.

    \b
    Examples:
      edgeqtl device run --bundle bundles/pi --broker mqtts://broker.lan --ca-file ca.crt < jobs.jsonl
      edgeqtl device run --bundle bundles/pi --broker mqtt://broker.lan --watch /var/lib/edgeqtl/inbox
    """
    import logging
    import socket as _socket

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.device_agent.runner import DeviceRunner, connect

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = DeviceClient(bundle, variant)
    dev_id = device_id or _socket.gethostname().split(".")[0]
    transport = connect(_broker_config(broker_url, ca_file, cert_file, key_file), dev_id)
    runner = DeviceRunner(client, transport, timeout=timeout, give_up_s=give_up)
    click.echo(f"device agent {dev_id} on {transport.endpoint.cfg.describe()} with {bundle}", err=True)
    try:
        if watch is not None:
            for done in runner.watch(watch):
                click.echo(f"answered {done.name} -> {watch / 'answers' / done.name}", err=True)
        else:
            base = Path.cwd() if jobs.name == "<stdin>" else Path(jobs.name).parent  # relative image paths
            runner.run_lines(jobs, out, base, "job")
    except KeyboardInterrupt:
        pass
    finally:
        transport.stop()


@device.command(name="train")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="The split model both sides start from (the server gets the same with --model).")
@_broker_options
@click.option("--device-id", default=None, help="This device's id (default: host name).")
@click.option("--index", "device_index", type=int, default=0, show_default=True,
              help="This device's shard number, 0 <= index < --devices.")
@click.option("--devices", "num_devices", type=int, default=1, show_default=True)
@click.option("--shard", default="iid", show_default=True,
              help="'iid', or 'dirichlet:ALPHA' for a non-IID family mix (smaller alpha: more skewed).")
@click.option("--trainable", default="projector,encoder", show_default=True,
              help="Client parts that train, from: projector, encoder, vision_tower, layers, embed_tokens.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per try of a step.")
@_split_train_options
@user_errors
@_transport_errors
def device_train(model_dir, broker_url, ca_file, cert_file, key_file, device_id, device_index, num_devices, shard,
                 trainable, timeout, steps, batch_size, lr, checkpoint_every, fedavg_every, state_dir, threads):
    """Split training on this device: its images never leave it; codes go up, compressed
    gradients come back. Needs torch (autograd); inference on the device does not.

    \b
    Example (two devices, non-IID, against `edgeqtl server --train ... --devices 2`):
      edgeqtl device train --model runs/tiny-2bit --index 0 --devices 2 --shard dirichlet:0.5 \\
          --broker mqtt://broker.lan --state-dir runs/dev0
    """
    import socket as _socket

    import torch
    from tqdm import tqdm

    from edgeqtl import shapes
    from edgeqtl.device_agent.runner import connect
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.models.split_training import DeviceTrainer, SplitTrainConfig, run_device

    if threads:
        torch.set_num_threads(threads)
    if not 0 <= device_index < num_devices:
        raise UserError(f"--index must be in [0, {num_devices - 1}]")
    if shard == "iid":
        alpha = None
    elif shard.startswith("dirichlet:"):
        alpha = float(shard.split(":", 1)[1])
    else:
        raise UserError(f"--shard is 'iid' or 'dirichlet:ALPHA', got {shard!r}")
    model = load_split_model(model_dir)
    dev_id = device_id or _socket.gethostname().split(".")[0]
    tcfg = SplitTrainConfig(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                            fedavg_every=fedavg_every, trainable=tuple(t.strip() for t in trainable.split(",")))
    trainer = DeviceTrainer(model, shapes.build_tokenizer(), tcfg, dev_id, device_index, num_devices, alpha,
                            state_dir, bytes.fromhex(fingerprint(model))[:16])
    transport = connect(_broker_config(broker_url, ca_file, cert_file, key_file), dev_id)
    bar = tqdm(total=steps, initial=trainer.step, desc=f"split train {dev_id}", dynamic_ncols=True)

    class Link:
        def request(self, frame):
            return transport.request(frame, timeout=timeout, retries=1000)  # waits out a server restart

    def on_step(t, info):
        bar.update(1)
        n = max(1, t.step)
        bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{100 * info['token_accuracy']:.0f}%",
                        up=f"{t.bytes_up / n / 1024:.1f}K", down=f"{t.bytes_down / n / 1024:.1f}K")

    try:
        run_device(trainer, Link(), on_step)
    finally:
        bar.close()
        transport.stop()
    n = max(1, trainer.step)
    click.echo(f"trained {trainer.step} steps; per step up {trainer.bytes_up / n:,.0f} B (16-bit "
               f"{trainer.fp16_up / n:,.0f} B, {100 * (1 - trainer.bytes_up / max(1, trainer.fp16_up)):.1f}% saved), "
               f"down {trainer.bytes_down / n:,.0f} B (16-bit {trainer.fp16_down / n:,.0f} B, "
               f"{100 * (1 - trainer.bytes_down / max(1, trainer.fp16_down)):.1f}% saved)")


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="The split model the run started from.")
@click.option("--server-state", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The training server's --state-dir.")
@click.option("--device-state", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The --state-dir of the device whose client half to keep.")
@click.option("--device-id", required=True, help="That device's id.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@user_errors
def merge(model_dir, server_state, device_state, device_id, out):
    """Merge a split-training run into one split model directory (for `edgeqtl export`):
    the server's trained trunk plus one device's trained client parts.

    \b
    Example:
      edgeqtl merge --model runs/start --server-state runs/srv --device-state runs/dev0 \\
          --device-id pi-0001 --out runs/split-trained && edgeqtl export --model runs/split-trained --out bundles/x
    """
    from edgeqtl.models.split_training import merge_trained

    click.echo(f"merged into {merge_trained(model_dir, server_state, device_state, device_id, out)}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/edgeqtl-demo"), show_default=True,
              help="Where the trained model and the bundle are cached between runs.")
@click.option("--steps", type=int, default=2000, show_default=True,
              help="Training steps when no trained model is cached (5500 reaches the benchmark's accuracy).")
@click.option("--questions", type=int, default=100, show_default=True, help="Held-out questions to ask.")
@click.option("--retrain", is_flag=True, help="Train again even if a model is cached.")
@user_errors
@_transport_errors
def demo(workdir, steps, questions, retrain):
    """End to end on this machine: train the tiny model (if not cached), export a
    bundle, start a broker, a server agent and a device agent, and ask questions.

    \b
    Example:
      edgeqtl demo
      edgeqtl demo --steps 5500 --retrain     # the full recipe (~12 min on 2 cores)
    """
    import dataclasses
    import shutil

    from edgeqtl import shapes
    from edgeqtl.broker import MosquittoBroker, start_broker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.training import TrainConfig
    from edgeqtl.models.training import train as run_training
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    model_dir, bundle_dir = workdir / "model", workdir / "bundle"
    if retrain or not (model_dir / "edgeqtl_split.json").is_file():
        for d in (model_dir, bundle_dir):
            if d.exists():
                shutil.rmtree(d)
        click.echo(f"1/4 training the tiny model, 2-bit codes at cut 0, {steps} steps -> {model_dir}")
        base = TrainConfig()
        cfg = dataclasses.replace(base, steps=steps, curriculum_steps=min(base.curriculum_steps, steps // 3),
                                  vision_steps=min(base.vision_steps, steps // 5))
        run_training(SplitModel(build_tiny(0), SplitConfig(cut=0, levels=4)), shapes.build_tokenizer(), cfg,
                     out_dir=model_dir)
    else:
        click.echo(f"1/4 using the trained model cached in {model_dir} (--retrain to train again)")
    if (bundle_dir / "manifest.json").is_file():
        click.echo(f"2/4 using the device bundle cached in {bundle_dir}")
    else:
        click.echo(f"2/4 exporting and verifying the device bundle -> {bundle_dir}")
        res = export_bundle(ExportOptions(model_dir, bundle_dir, verify_per_family=20), progress=None)
        click.echo(res.verification.table())

    broker = start_broker()
    mosquitto = isinstance(broker, MosquittoBroker)
    click.echo(f"3/4 broker: {'mosquitto' if mosquitto else 'embedded amqtt'} on {broker.url}")
    try:
        cfg = BrokerConfig.from_url(broker.url)
        engine = load_engine(bundle_dir / "server")
        with ServerAgent(engine, cfg, group="edgeqtl-servers" if mosquitto else None), \
                RequestClient(cfg, "demo-device") as transport:
            client = DeviceClient(bundle_dir)
            samples = shapes.heldout(max(1, questions // len(shapes.FAMILIES)))
            click.echo(f"4/4 the device asks {len(samples)} held-out questions through the broker")
            right, up, fp16, lat = 0, 0, 0, []
            for i, s in enumerate(samples):
                a = client.ask(transport, s.image, s.question)
                ok = shapes.answer_word(a.text) == s.answer
                right += ok
                up, fp16 = up + a.bytes_up, fp16 + a.bytes_up_fp16
                lat.append(a.latency_s)
                if i % max(1, len(samples) // 8) == 0:
                    click.echo(f"   {s.question:<52} -> {a.text:<10} ({'right' if ok else 'wrong, ' + s.answer})")
    finally:
        broker.stop()
    n = len(samples)
    click.echo(f"held-out accuracy over the broker: {100 * right / n:.1f}% of {n}")
    click.echo(f"uplink: {up / n:.0f} B per question (frames, headers included) vs {fp16 / n:.0f} B as 16-bit "
               f"hidden states: {100 * (1 - up / fp16):.1f}% saved; median latency {1e3 * sorted(lat)[n // 2]:.1f} ms")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
