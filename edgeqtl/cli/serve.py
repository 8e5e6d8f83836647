"""Commands in the lab: a local broker, and the server agent, which answers devices'
questions (`server serve`) or trains the trunk for devices that keep their data
(`server train`, the twin of `device train`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import (UserError, broker_config, broker_options, login_id, serve_until_interrupted, set_threads,
                     sigterm_as_interrupt, split_train_config, split_train_options, threads_option,
                     user_errors)


@click.command()
@click.option("--port", type=int, default=None, help="Default 1883; with --secure 8883, or the port DIR was made with.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface). With --secure, also put in the server "
                   "certificate when DIR is made.")
@click.option("--max-packet-size", type=int, default=None, help="Advertised to MQTT 5 clients in CONNACK.")
@click.option("--secure", is_flag=True, help="TLS, a login per device and ACLs, kept in --dir (mosquitto only).")
@click.option("--dir", "secure_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The secure broker's directory (CA, keys, passwords, ACLs); made on first use.")
@click.option("--san", "names", multiple=True,
              help="A host name or address devices use to reach the broker, for the server certificate "
                   "(repeatable; 127.0.0.1 and localhost are always in it). Used when DIR is made, or when its "
                   "server.crt was deleted to be made again.")
@click.option("--mtls", is_flag=True, help="Devices log in with client certificates instead of passwords "
                                          "(decided when DIR is made).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Your own CA certificate instead of a new CA (first use of DIR only).")
@click.option("--ca-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Its private key (needed with --mtls, to sign the devices' certificates).")
@click.option("--cert-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Your own server certificate, signed by --ca-file (first use of DIR only).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The server certificate's private key (unencrypted).")
@user_errors
def broker(port, host, max_packet_size, secure, secure_dir, names, mtls, ca_file, ca_key, cert_file, key_file):
    """Run a local MQTT broker: mosquitto when installed (MQTT 5, shared subscriptions),
    from a generated config with TCP_NODELAY on; otherwise the embedded amqtt broker
    (MQTT 3.1.1, one server agent, `pip install edgeqtl[demo]`). Open to anyone who can
    reach it: for demos and tests.

    With --secure: mosquitto with TLS, a login per device (`edgeqtl provision`) and ACLs
    that confine each device to its own topics, all kept in --dir (docs/SECURITY.md).
    Logins provisioned while it runs work at once (it reloads them).

    \b
    Examples:
      edgeqtl broker --port 1883
      edgeqtl broker --secure --dir /srv/edgeqtl-broker --host 0.0.0.0 --san broker.lan
      edgeqtl provision pi-7 --dir /srv/edgeqtl-broker
    """
    import time

    from edgeqtl.broker import MosquittoBroker, start_broker

    sigterm_as_interrupt()  # `kill` stops mosquitto too, as Ctrl-C does
    secure_only = {"--dir": secure_dir, "--san": names, "--mtls": mtls, "--ca-file": ca_file, "--ca-key": ca_key,
                   "--cert-file": cert_file, "--key-file": key_file}
    if not secure:
        given = [name for name, value in secure_only.items() if value]
        if given:
            raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --secure; add --secure")
        b = start_broker(port=port or 1883, host=host, max_packet_size=max_packet_size)
        name = "mosquitto" if isinstance(b, MosquittoBroker) else "embedded amqtt (MQTT 3.1.1, no shared subscriptions)"
        click.echo(f"{name} listening on {b.url} (Ctrl-C to stop)")
        watched, seen = [], []
    else:
        b, watched, seen = _start_secure_broker(secure_dir, port, host, max_packet_size, names, mtls, ca_file,
                                                ca_key, cert_file, key_file)
    try:
        while getattr(b, "proc", None) is None or b.proc.poll() is None:
            time.sleep(0.5)
            now = [_version(p) for p in watched]
            if now != seen:  # `edgeqtl provision` wrote a login: have mosquitto read the files again
                seen = now
                b.reload()
                click.echo("reloaded the logins and ACLs")
        raise UserError(f"mosquitto exited with code {b.proc.returncode}"
                        + (f"; see {b.log_file}" if b.secure_dir is not None else ""))
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


def _start_secure_broker(secure_dir, port, host, max_packet_size, names, mtls, ca_file, ca_key, cert_file, key_file):
    """Make DIR on first use, check it on later ones, and start mosquitto on it."""
    import ipaddress

    from edgeqtl.broker import MosquittoBroker, find_mosquitto
    from edgeqtl.security import init_secure_dir

    if secure_dir is None:
        raise UserError("--secure keeps its CA, keys and passwords in a directory: add --dir DIR "
                        "(made on first use)")
    if find_mosquitto() is None:
        raise UserError("--secure needs mosquitto (Debian/Ubuntu: apt-get install mosquitto)")
    is_new = not (secure_dir / "settings.json").exists()
    wildcard = host in ("0.0.0.0", "::", "")
    # the listen address goes in a certificate made here; your own one names what it names
    hosts = [*names, *([] if wildcard or cert_file else [host])]
    try:
        listen_ip = ipaddress.ip_address(host)
    except ValueError:
        listen_ip = None
    layout = init_secure_dir(secure_dir, hosts=hosts if (is_new or names) else None, mtls=mtls or None,
                             **({"port": port} if port else {}), ca_file=ca_file, ca_key=ca_key,
                             cert_file=cert_file, key_file=key_file)
    settings = layout.settings
    if port and port != settings.port:
        raise UserError(f"{secure_dir}'s login files name port {settings.port}; drop --port, or use a new --dir")
    watched = [layout.passwd, layout.acl]
    seen = [_version(p) for p in watched]  # before mosquitto reads them: a login written meanwhile is not missed
    b = MosquittoBroker.secure(secure_dir, host=host, max_packet_size=max_packet_size).start()
    login = "client certificates (mTLS)" if settings.mtls else "passwords"
    click.echo(f"mosquitto listening on {host}:{b.port}: TLS, {login}, ACLs from {secure_dir} (Ctrl-C to stop)")
    if is_new:
        ca, cert = ("your CA" if ca_file else "a new CA"), ("your" if cert_file else "a new")
        click.echo(f"made {secure_dir}: {ca} and {cert} server certificate for {', '.join(settings.hosts)}")
    local = ("127.0.0.1", "localhost", "::1")
    if listen_ip is not None and listen_ip.is_loopback and any(h not in local for h in settings.hosts):
        click.echo(f"note: listening on {host} only; devices on the network need --host 0.0.0.0")
    if wildcard and all(h in local for h in settings.hosts):
        click.echo(f"note: the server certificate names only {', '.join(settings.hosts)}; for devices on the "
                   f"network delete {layout.server_cert} and {layout.server_key} and run again with --san NAME")
    click.echo(f"add a device: edgeqtl provision DEVICE_ID --dir {secure_dir}   (log: {b.log_file})")
    return b, watched, seen


def _version(path: Path) -> tuple | None:
    """Changes whenever the file is rewritten (security.py replaces it: a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@click.group()
def server():
    """The server agent: answer devices' questions (serve) or split-train with them (train)."""


def _start_metrics(agent, port, sessions, steps=None):
    """--metrics-port: Prometheus metrics and health on that port (edgeqtl/metrics.py)."""
    if port is None:
        return None
    from edgeqtl.metrics import AgentMetrics, MetricsServer

    agent.metrics = AgentMetrics(agent.server_id)
    agent.metrics.sessions_fn, agent.metrics.steps_fn = sessions, steps
    try:
        server = MetricsServer(agent.metrics, ready=lambda: agent.endpoint.connected, port=port).start()
    except OSError as e:
        raise UserError(f"cannot serve metrics on port {port}: {e}") from None
    click.echo(f"metrics on http://0.0.0.0:{server.port}/metrics (health: /healthz, /readyz)", err=True)
    return server


def _subscription_options(fn):
    fn = click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                      help="Serve Prometheus metrics (/metrics) and health (/healthz, /readyz) on this port.")(fn)
    fn = click.option("--session-expiry", type=click.IntRange(0), default=None,
                      help="Seconds the broker keeps this agent's session while it is away, with the requests that "
                           "arrive meanwhile (needs a fixed --server-id). Default: a clean session. Caution: mosquitto "
                           "2.0 also hands an absent member of a shared group its share of new requests, which then "
                           "wait for it or for the device's retry (docs/PROTOCOL.md, Sessions).")(fn)
    fn = click.option("--server-id", default=None,
                      help="This agent's MQTT client id and topic (default: the --login file's id, else random). "
                           "Under the secure broker's ACLs it must be the id the server was provisioned for.")(fn)
    fn = click.option("--group", default="edgeqtl-servers", show_default=True,
                      help="Shared-subscription group: agents in one group split the requests.")(fn)
    fn = click.option("--no-shared", is_flag=True, help="Plain subscription, for brokers without $share (amqtt).")(fn)
    return fn


def _with_session(cfg, session_expiry, server_id):
    import dataclasses

    if session_expiry is None:
        return cfg
    if session_expiry and not server_id:
        raise UserError("--session-expiry keeps a session under this agent's id: give it a fixed --server-id "
                        "(a random one would leave a session nobody comes back to)")
    return dataclasses.replace(cfg, session_expiry=session_expiry)


@server.command()
@click.option("--server-half", "server_halves", type=click.Path(path_type=Path), required=True, multiple=True,
              help="The server/ directory of an exported bundle; repeat it to serve several exports side by side "
                   "(each request goes to the one its bundle's fingerprint names).")
@broker_options
@_subscription_options
@click.option("--device", "torch_device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="The server half's dtype (default: fp32 on the CPU, bf16 on CUDA).")
@click.option("--max-batch-tokens", type=int, default=None,
              help="A batch of prompts holds at most this many tokens, padding included (memory bound).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None,
              help="A request's default answer length (default: the checkpoint's generation config, else 8).")
@click.option("--max-new-tokens-limit", type=click.IntRange(1), default=None,
              help="No request gets more, whatever it asks (default 1024).")
@click.option("--greedy", is_flag=True, help="Refuse requests that ask to sample (temperature > 0).")
@click.option("--image-cache-mb", type=click.IntRange(0), default=256, show_default=True,
              help="Memory for image codes kept so that a device's next question about the same image can name "
                   "it by digest (0: off).")
@click.option("--image-cache-ttl", type=click.FloatRange(0), default=300.0, show_default=True,
              help="Seconds an image's codes are kept after their last use.")
@click.option("--max-memory-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="Refuse to start when the server halves' weights together exceed this.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests waiting together are answered in one batch of at most this many (1: one at a time).")
@threads_option
@user_errors
def serve(server_halves, broker_url, login, ca_file, cert_file, key_file, metrics_port, session_expiry, server_id, group, no_shared,
          torch_device,
          dtype, max_batch_tokens, max_new_tokens, max_new_tokens_limit, greedy, image_cache_mb, image_cache_ttl,
          max_memory_gb, max_batch, threads):
    """Answer devices' questions with the server half of a bundle (or of several).

    \b
    Examples:
      edgeqtl server serve --server-half bundles/pi/server --broker mqtt://broker.lan:1883
      edgeqtl server serve --server-half bundles/v1/server --server-half bundles/v2/server --max-memory-gb 12
    """
    from edgeqtl.server_agent.agent import ServerAgent, describe, load_engine
    from edgeqtl.server_agent.image_cache import ImageCache
    from edgeqtl.server_agent.router import check_memory_bound

    sigterm_as_interrupt()
    set_threads(threads)
    cfg = broker_config(broker_url, ca_file, cert_file, key_file, login)
    cfg = _with_session(cfg, session_expiry, server_id or login_id(login))
    check_memory_bound(list(server_halves), None if max_memory_gb is None else int(max_memory_gb * 2 ** 30))
    engines = [load_engine(half, max_new_tokens=max_new_tokens, device=torch_device, dtype=dtype,
                           max_batch_tokens=max_batch_tokens, max_new_tokens_limit=max_new_tokens_limit,
                           greedy=greedy, image_cache=ImageCache(ttl_s=image_cache_ttl,
                                                                 max_bytes=image_cache_mb * 2 ** 20))
               for half in server_halves]
    agent = ServerAgent(engines, cfg, group=None if no_shared else group, client_id=server_id or login_id(login),
                        max_batch=max_batch).start()
    click.echo(f"server agent on {cfg.describe()}: {describe(agent.router)} (Ctrl-C to stop)", err=True)
    metrics = _start_metrics(agent, metrics_port, lambda: len(agent.router.sessions))

    def stop():
        if metrics is not None:
            metrics.stop()
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
@click.option("--devices-per-round", type=click.IntRange(0), default=0, show_default=True,
              help="With --fedavg-every: K of the --devices take part in each round (0: all).")
@click.option("--sampling", type=click.Choice(["random", "first"]), default="random", show_default=True,
              help="Which K: a seeded random choice per round, or the first K to send their weights.")
@click.option("--round-deadline", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds after a round opens when it closes with the weights it has; later devices are left "
                   "out of it (0: wait for all).")
@split_train_options
@user_errors
def train_server(model_dir, broker_url, login, ca_file, cert_file, key_file, metrics_port, session_expiry, server_id, group, no_shared,
                 num_devices, grad_codec, devices_per_round, sampling, round_deadline, steps, batch_size, lr,
                 checkpoint_every, fedavg_every, state_dir, private_labels, hidden_codec, threads):
    """Split training, the server's side: trains the trunk of --model on the codes that
    devices running `edgeqtl device train` send, and sends compressed gradients back.

    \b
    Example:
      edgeqtl server train --model runs/tiny-2bit --devices 2 --state-dir runs/srv --broker mqtt://broker.lan
    """
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.server_agent.training import TrainingService
    from edgeqtl.transport import Responder

    sigterm_as_interrupt()
    set_threads(threads)
    cfg = broker_config(broker_url, ca_file, cert_file, key_file, login)
    cfg = _with_session(cfg, session_expiry, server_id or login_id(login))
    model = load_split_model(model_dir)
    if devices_per_round > num_devices:
        raise UserError(f"--devices-per-round {devices_per_round} is more than the {num_devices} --devices")
    tcfg = split_train_config(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                              fedavg_every=fedavg_every, grad_codec=grad_codec, devices_per_round=devices_per_round,
                              sampling=sampling, round_deadline_s=round_deadline, private_labels=private_labels,
                              hidden_codec=hidden_codec)
    service = TrainingService(model, tcfg, state_dir, num_devices, bytes.fromhex(fingerprint(model))[:16])
    agent = Responder(cfg, service.handle_batch, group=None if no_shared else group,
                      client_id=server_id or login_id(login)).start()
    click.echo(f"training server on {cfg.describe()}: {num_devices} device(s), {grad_codec} gradients, "
               f"{'label-private, ' if private_labels else ''}"
               f"resuming at {service.server_steps} steps (Ctrl-C to stop)", err=True)
    metrics = _start_metrics(agent, metrics_port, lambda: len(service.ledgers), lambda: service.server_steps)

    def stop():
        if metrics is not None:
            metrics.stop()
        agent.stop()
        if state_dir is not None:
            service.save()
        service.close()
        steps_by_device = {d: ledger.step for d, ledger in service.ledgers.items()}
        click.echo(f"stopped after {service.server_steps} steps: {json.dumps(steps_by_device)}", err=True)

    serve_until_interrupted(stop)
