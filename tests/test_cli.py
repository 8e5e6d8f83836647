"""The CLI: help with examples, and one clear line for user errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeqtl.cli import main


@pytest.mark.parametrize("cmd", [["train"], ["eval"]])
def test_help_shows_an_example(cmd):
    r = CliRunner().invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0 and "Example" in r.output


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], r.output


def test_missing_checkpoint_directory(tmp_path):
    r = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "missing")])
    _one_line_error(r, "not found")


def test_a_checkpoint_of_no_supported_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = CliRunner().invoke(main, ["train", "--model", str(tmp_path), "--data", str(tmp_path / "d.json"), "--out",
                                  str(tmp_path / "o")])
    _one_line_error(r, "not a supported VLM family")


def test_cut_out_of_range(tmp_path):
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--cut", "9", "--out", str(tmp_path)])
    _one_line_error(r, "cut must be in [0, 5]")


def test_conflicting_bits_and_levels(tmp_path):
    r = CliRunner().invoke(main, ["train", "--bits", "2", "--levels", "3", "--out", str(tmp_path)])
    _one_line_error(r, "--bits 2")
