"""What the commands share: one-line user errors, the options several commands take,
and small helpers. Torch is never imported here (the device commands stay torch-free)."""
from __future__ import annotations

import dataclasses
import functools
import socket
import time
from pathlib import Path

import click

from edgeqtl.errors import EdgeqtlError


class UserError(click.ClickException):
    """One clear line for a mistake the user can fix; never a traceback."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def user_errors(fn):
    """Errors a user can cause and fix (edgeqtl's own, a missing or unreadable file)
    become one line saying what and how. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (EdgeqtlError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                FileExistsError) as e:
            raise UserError(str(e)) from None

    return wrapper


# --------------------------------------------------------------------------- options


def split_options(fn):
    """Where to cut and how to quantize (train, export of a plain checkpoint)."""
    fn = click.option("--cut", type=int, default=None,
                      help="Decoder layers that run on the device (0 <= cut < layers). Default 0.")(fn)
    fn = click.option("--bits", type=click.IntRange(1, 8), default=None,
                      help="Code bits per symbol: levels = 2**bits. Default 2.")(fn)
    fn = click.option("--levels", type=click.IntRange(2, 256), default=None,
                      help="Quantizer levels, any L >= 2 (e.g. 3 = 1.58 bits).")(fn)
    return fn


def levels_from(bits: int | None, levels: int | None) -> int | None:
    """--bits B and --levels L name one thing (L = 2**B); None when neither is given."""
    if bits is not None and levels is not None and levels != 2 ** bits:
        raise UserError(f"--bits {bits} means {2 ** bits} levels but --levels {levels} was given; pass one of them")
    return levels if levels is not None else (2 ** bits if bits is not None else None)


def broker_options(fn):
    fn = click.option("--broker", "broker_url", default=None,
                      help="mqtt://[user:pass@]host[:port] or mqtts://...; add ?protocol=3.1.1 for old brokers, "
                           "&max_message_size=BYTES for brokers with a message limit (AWS IoT: 131072). Default: "
                           "the --login file's broker, else mqtt://127.0.0.1:1883.")(fn)
    fn = click.option("--login", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="A login file from `edgeqtl provision` (edgeqtl-device.json / edgeqtl-server.json): "
                           "broker, username, password or client certificate, CA.")(fn)
    fn = click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="CA certificate for mqtts://.")(fn)
    fn = click.option("--cert-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Client certificate (mutual TLS).")(fn)
    fn = click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Client certificate's key.")(fn)
    return fn


def broker_config(broker_url: str | None, ca_file: str | None, cert_file: str | None, key_file: str | None,
                  login: str | None = None):
    """The broker to connect to: from --login (a provisioned login), else --broker; the
    certificate options override either."""
    from edgeqtl.transport import BrokerConfig

    files = dict(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    if login is not None:
        from edgeqtl.security import load_credentials

        creds = load_credentials(login)
        cfg = creds.broker_config(**{k: v for k, v in files.items() if v is not None})
        if broker_url is not None:  # another address for the same broker (e.g. its LAN name)
            other = BrokerConfig.from_url(broker_url)
            cfg = dataclasses.replace(cfg, host=other.host, port=other.port, protocol=other.protocol,
                                      max_message_size=other.max_message_size or cfg.max_message_size)
        return cfg
    return BrokerConfig.from_url(broker_url or "mqtt://127.0.0.1:1883", **files)


def login_id(login: str | None) -> str | None:
    """The id a login file was provisioned for (a device's id, a server's id)."""
    if login is None:
        return None
    from edgeqtl.security import load_credentials

    return load_credentials(login).id


def device_id_option(fn):
    return click.option("--device-id", default=None, help="This device's id (default: the host name).")(fn)


def default_device_id(device_id: str | None) -> str:
    return device_id or socket.gethostname().split(".")[0]


def threads_option(fn):
    return click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")(fn)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def split_train_options(fn):
    """What the server and the devices of one split-training run must agree on."""
    fn = click.option("--steps", type=int, default=1000, show_default=True, help="Training steps per device.")(fn)
    fn = click.option("--batch-size", type=int, default=32, show_default=True)(fn)
    fn = click.option("--lr", type=float, default=3e-3, show_default=True,
                      help="Peak learning rate (lower it, e.g. 1e-3, when starting from a trained model).")(fn)
    fn = click.option("--checkpoint-every", type=int, default=100, show_default=True,
                      help="Checkpoint every N steps (the server: N steps of all devices together).")(fn)
    fn = click.option("--fedavg-every", type=int, default=0, show_default=True,
                      help="Average the devices' trainable weights through the server every R steps (0: off).")(fn)
    fn = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Checkpoints (and the server's write-ahead log): restart with the same directory to "
                           "resume.")(fn)
    fn = click.option("--private-labels", is_flag=True, default=False,
                      help="Label-private (U-shaped): the device keeps norm, lm_head, the answers and the loss; the "
                           "server never receives an answer id (docs/TRAINING.md). Both sides must say it.")(fn)
    fn = click.option("--hidden-codec", type=click.Choice(["fp16", "int8", "int4"]), default="int8",
                      show_default=True,
                      help="With --private-labels: how the trunk's hidden states come down and their gradient goes "
                           "up.")(fn)
    fn = threads_option(fn)
    return fn


def split_train_config(**fields):
    """models.steps.SplitTrainConfig from the split_train_options' values (and the others given)."""
    from edgeqtl.models.steps import SplitTrainConfig  # torch: imported when a training command runs

    return SplitTrainConfig(**fields)


def describe_split(split) -> str:
    if split.quantizer == "fsq":
        return f"{split.levels} levels ({split.bits_per_symbol:.2f} bits)"
    return "16-bit baseline" if split.quantizer == "fp16" else "identity"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """From now on `kill` (SIGTERM) stops a service as cleanly as Ctrl-C: state saved,
    connection closed. Call it first thing, before the service says it is up."""
    import signal

    signal.signal(signal.SIGTERM, _interrupt)


def serve_until_interrupted(stop) -> None:
    """Block until Ctrl-C or SIGTERM (after sigterm_as_interrupt), then `stop()`."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def data_options(fn):
    """A LLaVA data file and how to read it (edgeqtl/data.py)."""
    fn = click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Resolve the data's relative image paths here instead of beside the data file.")(fn)
    fn = click.option("--skip-bad", is_flag=True,
                      help="Skip bad records (each reported on one line) instead of stopping before training.")(fn)
    return fn
