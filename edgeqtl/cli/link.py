"""`edgeqtl link`: a user-space link emulator in front of a broker (edgeqtl/link.py). Torch-free."""
from __future__ import annotations

import click

from edgeqtl.link import PROFILES

from .common import user_errors


@click.command()
@click.option("--listen", required=True, help="PORT (on 127.0.0.1) or HOST:PORT for devices to connect to.")
@click.option("--to", "to", required=True, help="The broker, HOST:PORT.")
@click.option("--profile", type=click.Choice(list(PROFILES)), default=None,
              help="A named link (rates and delay); the options below override its parts.")
@click.option("--rate", default=None, help="Both directions, e.g. 10mbit, 60kbit, 1.5Mbit/s.")
@click.option("--up", default=None, help="Device to broker only, e.g. 60kbit.")
@click.option("--down", default=None, help="Broker to device only.")
@click.option("--delay", default=None, help="One-way delay, e.g. 20ms, 1s.")
@click.option("--jitter", default=None, help="Extra random delay per chunk, up to this (never reorders).")
@click.option("--seed", type=int, default=None, help="Seed of the jitter.")
@user_errors
def link(listen, to, profile, rate, up, down, delay, jitter, seed):
    """Relay TCP from --listen to the broker through an emulated link, until Ctrl-C:
    rate, one-way delay and jitter per direction, no root needed. Point the device agent
    at the --listen port.

    \b
    Example:
      edgeqtl link --listen 1884 --to 127.0.0.1:1883 --rate 10mbit --delay 20ms
      edgeqtl link --listen 1884 --to broker.lab:1883 --profile nbiot
      edgeqtl device ask --bundle b --broker mqtt://127.0.0.1:1884 --image q.png --prompt "..."
    """
    from edgeqtl.link import run_link

    try:
        run_link(listen, to, rate, delay, jitter, profile, up=up, down=down, seed=seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
