"""The `edgeqtl` command line: a table of commands. Each command only parses its options
and calls into the package; torch is imported inside the commands that need it, so
`import edgeqtl` and the device commands stay torch-free.

    workstation  train, eval, calibrate, export, merge, zoo, convert (cli/model.py), bundle inspect (cli/bundle.py)
    data         data export, data check              (cli/data.py)
    lab          broker, server serve, server train  (cli/serve.py), provision (cli/provision.py)
    device       device ask, device run, device train (cli/device.py)
    network      link (an emulated slow link)         (cli/link.py)
    everything   demo (cli/demo.py), bench (cli/bench.py)
"""
from __future__ import annotations

import click

from edgeqtl import __version__

from .bench import bench
from .bundle import bundle
from .data import data
from .demo import demo
from .device import device
from .link import link
from .model import calibrate, convert, evaluate, export, merge, train, zoo
from .provision import provision
from .serve import broker, server


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeqtl")
def main():
    """edgeqtl: split a vision-language model between an edge device and a server.

    \b
    Quick start (the built-in tiny model on the shapes benchmark):
      edgeqtl demo
      edgeqtl train --preset tiny --bits 2 --out runs/tiny-2bit
      edgeqtl eval --model runs/tiny-2bit
    """


COMMANDS = [train, evaluate, calibrate, export, merge, zoo, convert, bundle, data, broker, provision, server, device, link, demo, bench]
for command in COMMANDS:
    main.add_command(command)
