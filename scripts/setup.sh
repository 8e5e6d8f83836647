#!/usr/bin/env bash
# Set up edgeqtl on a fresh machine, from a checkout:
#   - a virtual environment in .venv (EDGEQTL_VENV to put it elsewhere) holding torch
#     2.13.0 and this package with every extra (device, server, export, dev);
#   - mosquitto, the MQTT broker that the tests start on a free loopback port (Debian or
#     Ubuntu, with apt-get as root or through sudo; elsewhere it says how to get it).
# Safe to run again: what is there already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=${EDGEQTL_VENV:-.venv}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first, pinned: everything after that needs torch resolves to it instead of pulling
# the newest release (on these machines a local CPU wheel; elsewhere set
# EDGEQTL_TORCH_INDEX=https://download.pytorch.org/whl/cpu to skip the multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q torch==2.13.0 ${EDGEQTL_TORCH_INDEX:+--index-url "$EDGEQTL_TORCH_INDEX"}
"$VENV/bin/python" -m pip install -q -e ".[device,server,export,dev]"

if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo="-"; fi
if command -v apt-get >/dev/null 2>&1 && [ "$sudo" != "-" ]; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
else
  echo "setup: mosquitto is not installed and cannot be installed from here; install it with your" \
       "package manager (the tests need it; edgeqtl demo falls back to an embedded broker)" >&2
fi
