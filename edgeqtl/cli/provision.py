"""`edgeqtl provision`: give a device, or a server agent, its own login on the secure
broker of `edgeqtl broker --secure --dir DIR` (edgeqtl/security.py)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors


@click.command()
@click.argument("client_id", metavar="DEVICE_ID")
@click.option("--dir", "secure_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The secure broker's directory (made by `edgeqtl broker --secure --dir DIR`).")
@click.option("--server", is_flag=True,
              help="A server agent instead of a device: it reads every request and may answer any device.")
@click.option("--replace", is_flag=True, help="Issue a new login for an id that has one (for a lost or leaked one).")
@user_errors
def provision(client_id, secure_dir, server, replace):
    """Give DEVICE_ID its own login on the secure broker in --dir: a password (a client
    certificate if DIR was made with --mtls) and the CA certificate, in
    DIR/devices/DEVICE_ID/ (DIR/servers/ with --server). Copy that folder to the device; the password is in its
    edgeqtl-device.json and is never printed. A running `edgeqtl broker --secure` picks
    the login up by itself.

    \b
    Examples:
      edgeqtl provision pi-7 --dir /srv/edgeqtl-broker
      scp -r /srv/edgeqtl-broker/devices/pi-7 pi@pi-7.lan:edgeqtl-login
      edgeqtl provision gpu-1 --server --dir /srv/edgeqtl-broker
    """
    from edgeqtl.security import load_credentials, open_secure_dir, provision_device, provision_server

    layout = open_secure_dir(secure_dir)  # first: a wrong --dir is the likeliest mistake
    login_file = (provision_server if server else provision_device)(layout.root, client_id, replace=replace)
    login = load_credentials(login_file)
    role = "server agent" if server else "device"
    secret = "client.key holds its private key" if login.cert_file else f"{login_file.name} holds its password"
    click.echo(f"{role} {client_id}: login written to {login_file.parent}/ (broker {login.broker}; {secret}, "
               "readable by you only)")
    click.echo(f"copy that folder to the {role} and keep it private; a running `edgeqtl broker --secure --dir "
               f"{secure_dir}` reads the new login within a second (another mosquitto: send it SIGHUP)")
    if replace and login.cert_file:
        click.echo("note: the old certificate stays valid until it expires (there is no revocation list); "
                   "if it leaked, start a new --dir")
    if server:
        click.echo(f"the agent must connect with client id {client_id} (its decode-step topic is named after it)")
