"""Commands on the device: ask a question, run unattended (both torch-free), and split
training (the twin of `server train`; it needs torch)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import (UserError, broker_config, broker_options, data_options, default_device_id, device_id_option,
                     login_id, set_threads, split_train_config, split_train_options,
                     user_errors)


@click.group()
def device():
    """The device agent (no torch): ask questions with a bundle over MQTT; split training."""


def _variant_option(fn):
    return click.option("--variant", type=click.Choice(["fp32", "int8", "fp16"]), default=None,
                        help="Which client graph (default: the bundle's first).")(fn)


def _generation_options(fn):
    fn = click.option("--stop", multiple=True, help="End the answer before this string (repeatable).")(fn)
    fn = click.option("--seed", type=int, default=None,
                      help="Sampling seed (default: from the request id, so a retry samples the same).")(fn)
    fn = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                      help="Nucleus sampling mass (default: the checkpoint's).")(fn)
    fn = click.option("--temperature", type=click.FloatRange(0, 100), default=None,
                      help="0: greedy (default: the checkpoint's).")(fn)
    fn = click.option("--max-new-tokens", type=click.IntRange(1), default=None,
                      help="Answer length cap (default: the server's; the server caps it at its own limit).")(fn)
    return fn


def infer_options(max_new_tokens, temperature, top_p, seed, stop, stream=0):
    from edgeqtl.wire import InferOptions

    return InferOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop=tuple(stop), stream=stream)


@device.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="An exported bundle directory.")
@broker_options
@click.option("--image", type=click.Path(path_type=Path), required=True)
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="The question about the image; repeat it for several questions about one image (after the "
                   "first, the image goes by reference when the server kept it).")
@device_id_option
@_variant_option
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per try.")
@_generation_options
@click.option("--stream", type=click.IntRange(0, 64), default=4, show_default=True,
              help="At cut 0, have the server send the answer every N tokens as it is made (0: all at the end). "
                   "At cut > 0 every token arrives as it is made anyway.")
@user_errors
def ask(bundle, broker_url, login, ca_file, cert_file, key_file, image, prompts, device_id, variant, timeout,
        max_new_tokens, temperature, top_p, seed, stop, stream):
    """Ask questions about one image; prints each answer as it comes, with its latency
    and the bytes sent.

    \b
    Examples:
      edgeqtl device ask --bundle bundles/pi --broker mqtt://broker.lan \\
          --image photo.png --prompt "what color is the circle ?"
      edgeqtl device ask --bundle bundles/pi --image photo.png --max-new-tokens 128 --temperature 0.7 \\
          --prompt "describe the image" --prompt "what is on the left ?"
    """
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.transport import RequestClient

    client = DeviceClient(bundle, variant)
    cfg = broker_config(broker_url, ca_file, cert_file, key_file, login)
    options = infer_options(max_new_tokens, temperature, top_p, seed, stop, stream if client.manifest.cut == 0 else 0)
    with RequestClient(cfg, default_device_id(device_id or login_id(login))) as t:
        for prompt in prompts:
            printed = _Printer(client.prompts.tok)
            a = client.ask(t, image, prompt, timeout=timeout, options=options, on_token=printed)
            printed.finish(a.text)
            ttft = f", first token {1e3 * a.first_token_s:.1f} ms" if a.first_token_s is not None else ""
            click.echo(f"latency {1e3 * a.latency_s:.1f} ms{ttft}, {a.round_trips} round trip(s), sent {a.bytes_up} B "
                       f"(16-bit hidden states: {a.bytes_up_fp16} B, {100 * (1 - a.bytes_up / a.bytes_up_fp16):.1f}% "
                       f"saved){', image by reference' if a.image_by_reference else ''}", err=True)


class _Printer:
    """Prints an answer's text as its tokens come (decoded whole each time, so that a
    character split across tokens comes out right)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tok.decode(self.ids)
        if text.startswith(self.shown) and "\ufffd" not in text[len(self.shown):]:
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text

    def finish(self, text: str) -> None:
        if text.startswith(self.shown):
            click.echo(text[len(self.shown):])
        else:  # a stop string cut what was streamed: the final answer stands on its own line
            click.echo(("\n" if self.shown else "") + text)


@device.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="An exported bundle directory.")
@broker_options
@click.option("--jobs", type=click.File("r"), default="-", show_default=True,
              help="A JSON-lines file of jobs ('-': standard input).")
@click.option("--watch", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Instead of --jobs: answer every *.jsonl dropped into this folder (answers/ and done/ beside).")
@click.option("--out", type=click.File("a"), default="-", show_default=True,
              help="Where answers go as JSON lines with --jobs ('-': standard output).")
@device_id_option
@_variant_option
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per try.")
@click.option("--give-up", type=float, default=None,
              help="Seconds a job may wait for the broker and a server before it gets an error line "
                   "(default: wait for ever).")
@user_errors
def run(bundle, broker_url, login, ca_file, cert_file, key_file, jobs, watch, out, device_id, variant, timeout,
        give_up):
    """Run the device agent unattended: jobs in, answers out, as JSON lines.

    A job is {"id": ..., "image": PATH, "prompt": TEXT} (and optionally "max_new_tokens",
    "temperature", "top_p", "seed", "stop"); each gets one answer line
    {"id": ..., "answer": ..., "latency_ms": ..., "bytes_up": ...} or {"id": ..., "error": ...}.
    Standard error gets one JSON line per job too ({"event": "job", "ok": ..., ...}), for a
    log shipper.
    Broker restarts are ridden out: jobs wait and retry, nothing is lost.

    \b
    Examples:
      edgeqtl device run --bundle bundles/pi --broker mqtts://broker.lan --ca-file ca.crt < jobs.jsonl
      edgeqtl device run --bundle bundles/pi --broker mqtt://broker.lan --watch /var/lib/edgeqtl/inbox
    """
    import logging

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.device_agent.runner import DeviceRunner, connect

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    jobs_log = logging.getLogger("edgeqtl.device.jobs")  # one JSON line per job on stderr, for a log shipper
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    jobs_log.addHandler(handler)
    jobs_log.setLevel(logging.INFO)
    jobs_log.propagate = False
    client = DeviceClient(bundle, variant)
    dev_id = default_device_id(device_id or login_id(login))
    transport = connect(broker_config(broker_url, ca_file, cert_file, key_file, login), dev_id)
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
@broker_options
@device_id_option
@click.option("--data", "data_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This device's own data (LLaVA records, JSON or JSON lines); it never leaves the device. "
                   "Without it: a shard of the built-in shapes world (--index, --devices, --shard).")
@data_options
@click.option("--index", "device_index", type=int, default=0, show_default=True,
              help="Without --data: this device's shard of the shapes world, 0 <= index < --devices.")
@click.option("--devices", "num_devices", type=int, default=1, show_default=True)
@click.option("--shard", default="iid", show_default=True,
              help="'iid', or 'dirichlet:ALPHA' for a non-IID family mix (smaller alpha: more skewed).")
@click.option("--trainable", default="projector,encoder", show_default=True,
              help="Client parts that train, from: projector, encoder, vision_tower, layers, embed_tokens.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per try of a step.")
@split_train_options
@user_errors
def train_device(model_dir, broker_url, login, ca_file, cert_file, key_file, device_id, data_file, image_root,
                 skip_bad, device_index, num_devices, shard, trainable, timeout, steps, batch_size, lr, checkpoint_every,
                 fedavg_every, state_dir, private_labels, hidden_codec, threads):
    """Split training, the device's side: its images never leave it; codes go up,
    compressed gradients come back. Needs torch (autograd); inference on the device does not.

    \b
    Examples (against `edgeqtl server train ... --devices 2`):
      edgeqtl device train --model runs/mine --data /data/clinic.jsonl --broker mqtt://broker.lan \\
          --state-dir runs/dev0
      edgeqtl device train --model runs/tiny-2bit --index 0 --devices 2 --shard dirichlet:0.5 \\
          --broker mqtt://broker.lan --state-dir runs/dev0
    """
    from tqdm import tqdm

    from edgeqtl import shapes
    from edgeqtl.device_agent.links import RetryingLink
    from edgeqtl.device_agent.runner import connect
    from edgeqtl.models.device_training import DeviceTrainer, RecordBatches, ShapesShard, run_device
    from edgeqtl.models.batches import Collator, image_spec_of
    from edgeqtl.models.jobs import DataOptions, checked
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.models.split import fingerprint
    set_threads(threads)
    if not 0 <= device_index < num_devices:
        raise UserError(f"--index must be in [0, {num_devices - 1}]")
    alpha = _dirichlet_alpha(shard)
    model = load_split_model(model_dir)
    dev_id = default_device_id(device_id or login_id(login))
    tcfg = split_train_config(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                              fedavg_every=fedavg_every, private_labels=private_labels, hidden_codec=hidden_codec,
                              trainable=tuple(t.strip() for t in trainable.split(",")))
    if data_file is not None:
        prompts = load_prompts(model_dir, model)
        batches = RecordBatches(Collator(prompts, image_spec_of(model)),
                                checked(data_file, DataOptions(data_file, None, image_root, skip_bad), model, prompts,
                                        lambda line: click.echo(line, err=True)),
                                batch_size, tcfg.seed)
    else:
        batches = ShapesShard(model, shapes.build_tokenizer(), tcfg, device_index, num_devices, alpha)
    trainer = DeviceTrainer(model, batches, tcfg, dev_id, state_dir, bytes.fromhex(fingerprint(model))[:16])
    transport = connect(broker_config(broker_url, ca_file, cert_file, key_file, login), dev_id)
    bar = tqdm(total=steps, initial=trainer.step, desc=f"split train {dev_id}", dynamic_ncols=True)

    def on_step(t, info):
        bar.update(1)
        n = max(1, t.step)
        bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{100 * info['token_accuracy']:.0f}%",
                        up=f"{t.bytes_up / n / 1024:.1f}K", down=f"{t.bytes_down / n / 1024:.1f}K")

    try:
        run_device(trainer, RetryingLink(transport, timeout=timeout), on_step)
    finally:
        bar.close()
        transport.stop()
    n = max(1, trainer.step)
    click.echo(f"trained {trainer.step} steps; per step up {trainer.bytes_up / n:,.0f} B (16-bit "
               f"{trainer.fp16_up / n:,.0f} B, {100 * (1 - trainer.bytes_up / max(1, trainer.fp16_up)):.1f}% saved), "
               f"down {trainer.bytes_down / n:,.0f} B (16-bit {trainer.fp16_down / n:,.0f} B, "
               f"{100 * (1 - trainer.bytes_down / max(1, trainer.fp16_down)):.1f}% saved)")


def _dirichlet_alpha(shard: str) -> float | None:
    if shard == "iid":
        return None
    if shard.startswith("dirichlet:"):
        try:
            return float(shard.split(":", 1)[1])
        except ValueError:
            pass
    raise UserError(f"--shard is 'iid' or 'dirichlet:ALPHA', got {shard!r}")
