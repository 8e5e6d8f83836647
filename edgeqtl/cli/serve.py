"""Commands in the lab: a local broker, and the server agent, which answers devices'
questions (`server serve`) or trains the trunk for devices that keep their data
(`server train`, the twin of `device train`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import (UserError, broker_config, broker_options, serve_until_interrupted, set_threads,
                     sigterm_as_interrupt, split_train_options, threads_option, user_errors)


@click.command()
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

    from edgeqtl.broker import MosquittoBroker, start_broker

    b = start_broker(port=port, host=host, max_packet_size=max_packet_size)
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


@click.group()
def server():
    """The server agent: answer devices' questions (serve) or split-train with them (train)."""


def _subscription_options(fn):
    fn = click.option("--group", default="edgeqtl-servers", show_default=True,
                      help="Shared-subscription group: agents in one group split the requests.")(fn)
    fn = click.option("--no-shared", is_flag=True, help="Plain subscription, for brokers without $share (amqtt).")(fn)
    return fn


@server.command()
@click.option("--server-half", type=click.Path(path_type=Path), required=True,
              help="The server/ directory of an exported bundle.")
@broker_options
@_subscription_options
@click.option("--device", "torch_device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests waiting together are answered in one batch of at most this many (1: one at a time).")
@threads_option
@user_errors
def serve(server_half, broker_url, ca_file, cert_file, key_file, group, no_shared, torch_device, max_new_tokens,
          max_batch, threads):
    """Answer devices' questions with the server half of a bundle.

    \b
    Example:
      edgeqtl server serve --server-half bundles/pi/server --broker mqtt://broker.lan:1883
    """
    from edgeqtl.server_agent.agent import ServerAgent, describe, load_engine

    sigterm_as_interrupt()
    set_threads(threads)
    cfg = broker_config(broker_url, ca_file, cert_file, key_file)
    engine = load_engine(server_half, max_new_tokens=max_new_tokens, device=torch_device)
    agent = ServerAgent(engine, cfg, group=None if no_shared else group, max_batch=max_batch).start()
    click.echo(f"server agent on {cfg.describe()}: {describe(engine)} (Ctrl-C to stop)", err=True)

    def stop():
        agent.stop()
        click.echo(f"stopped: {json.dumps(agent.stats())}", err=True)

    serve_until_interrupted(stop)


@server.command("train")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="The split model both sides start from (each device gets the same with --model).")
@broker_options
@_subscription_options
@click.option("--devices", "num_devices", type=int, default=1, show_default=True,
              help="How many devices train (the federated average waits for all of them).")
@click.option("--grad-codec", type=click.Choice(["fp16", "int8", "int4"]), default="int8", show_default=True,
              help="How gradients go back (int4: unbiased stochastic rounding).")
@split_train_options
@user_errors
def train_server(model_dir, broker_url, ca_file, cert_file, key_file, group, no_shared, num_devices, grad_codec,
                 steps, batch_size, lr, checkpoint_every, fedavg_every, state_dir, threads):
    """Split training, the server's side: trains the trunk of --model on the codes that
    devices running `edgeqtl device train` send, and sends compressed gradients back.

    \b
    Example:
      edgeqtl server train --model runs/tiny-2bit --devices 2 --state-dir runs/srv --broker mqtt://broker.lan
    """
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.models.steps import SplitTrainConfig
    from edgeqtl.server_agent.training import TrainingService
    from edgeqtl.transport import Responder

    sigterm_as_interrupt()
    set_threads(threads)
    cfg = broker_config(broker_url, ca_file, cert_file, key_file)
    model = load_split_model(model_dir)
    tcfg = SplitTrainConfig(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                            fedavg_every=fedavg_every, grad_codec=grad_codec)
    service = TrainingService(model, tcfg, state_dir, num_devices, bytes.fromhex(fingerprint(model))[:16])
    agent = Responder(cfg, service.handle_batch, group=None if no_shared else group).start()
    click.echo(f"training server on {cfg.describe()}: {num_devices} device(s), {grad_codec} gradients, "
               f"resuming at {service.server_steps} steps (Ctrl-C to stop)", err=True)

    def stop():
        agent.stop()
        if state_dir is not None:
            service.save()
        service.close()
        steps_by_device = {d: ledger.step for d, ledger in service.ledgers.items()}
        click.echo(f"stopped after {service.server_steps} steps: {json.dumps(steps_by_device)}", err=True)

    serve_until_interrupted(stop)
