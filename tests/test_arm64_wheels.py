"""The device extra installs on a Raspberry Pi or a Jetson (Linux aarch64) from binary
wheels alone: pip resolves it for that platform without building anything, so a
dependency that publishes no aarch64 wheel fails here, in CI, and not on a user's board.
Needs the package index (PyPI); skipped, saying so, only when it cannot be reached."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_34_aarch64"]
UNREACHABLE = ("Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "Could not fetch URL", "Max retries exceeded")


def device_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["device"]


@pytest.mark.parametrize("python", ["3.11", "3.13"])  # Pi OS bookworm / JetPack 6 ship 3.11; trixie 3.13
def test_device_extra_resolves_for_linux_aarch64_from_wheels_only(tmp_path, python):
    reqs = device_requirements()
    assert not any("torch" in r for r in reqs), "the device's inference path must not need torch"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--report", str(tmp_path / "report.json"), "--only-binary", ":all:", "--implementation", "cp",
           "--python-version", python, "--target", str(tmp_path / "t"), "--disable-pip-version-check",
           *[a for p in PLATFORMS for a in ("--platform", p)], *reqs]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and any(s in res.stderr for s in UNREACHABLE) and "No matching distribution" not in res.stderr:
        pytest.skip(f"the package index cannot be reached: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, f"the device extra does not install on aarch64 from wheels:\n{res.stderr[-3000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    wheels = {item["metadata"]["name"].lower(): item["download_info"]["url"].rsplit("/", 1)[-1]
              for item in report["install"]}
    for name in ("onnxruntime", "numpy", "pillow", "tokenizers", "paho-mqtt"):
        assert name in wheels, f"{name} missing from the resolved set {sorted(wheels)}"
    native = {n: w for n, w in wheels.items() if not w.endswith("-none-any.whl")}
    assert native and all("aarch64" in w for w in native.values()), native
