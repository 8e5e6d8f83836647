"""The device path never imports torch: every module under edgeqtl/ (the shared core:
wire, codec, transport, bundle, prompt, imageproc, data, CLI, ...) and under
device_agent/ (client, runner, session, links) is imported in a fresh interpreter that
then must not hold torch or transformers, without exception (device-side split
training, which needs autograd, lives in models/device_training.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(folder: str, package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        parts = [p for p in rel.parts if p not in ("__init__", "__main__")]
        if rel.name == "__main__":
            continue
        out.append(".".join([package, *parts]))
    return list(dict.fromkeys(out))


TORCH_FREE = _modules("edgeqtl", "edgeqtl") + _modules("device_agent", "edgeqtl.device_agent")


def test_the_guard_sees_the_device_path():
    for m in ("edgeqtl.wire", "edgeqtl.codec", "edgeqtl.transport", "edgeqtl.bundle", "edgeqtl.prompt",
              "edgeqtl.imageproc", "edgeqtl.cli", "edgeqtl.device_agent.client", "edgeqtl.device_agent.runner"):
        assert m in TORCH_FREE


def test_no_module_of_the_device_path_imports_torch():
    code = ("import importlib, sys\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    importlib.import_module(m)\n"
            "    bad = [x for x in ('torch', 'transformers') if x in sys.modules]\n"
            "    if bad:\n"
            "        print(m, 'pulled in', bad); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("args", [["--help"], ["device", "ask", "--help"], ["device", "run", "--help"]])
def test_cli_device_commands_do_not_import_torch(args):
    code = ("import sys; from click.testing import CliRunner; from edgeqtl.cli import main; "
            f"r = CliRunner().invoke(main, {args!r}); assert r.exit_code == 0, r.output; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
