"""The device path never imports torch: checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["edgeqtl", "edgeqtl.shapes", "edgeqtl.codec", "edgeqtl.imageproc", "edgeqtl.cli"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{module} pulled in {r.stdout.strip()} {r.stderr[-500:]}"


def test_cli_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from edgeqtl.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
