"""`edgeqtl export`: bundles for the tiny preset and two HF architectures, verified
against PyTorch; the decode-step graph; the server half on its own; clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgeqtl.bundle import BundleError, BundleManifest
from edgeqtl.cli import main
from edgeqtl.export.bundle import ExportOptions, export_bundle
from edgeqtl.models.load import CheckpointError, load_split_model
from edgeqtl.models.server_half import load_server_half
from edgeqtl.models.split import SplitConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny preset split model saved as `edgeqtl train` saves it (cut 2, 2 bits)."""
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitModel
    from edgeqtl.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    model = SplitModel(build_tiny(0), SplitConfig(cut=2, levels=4))
    save_checkpoint(model, d)
    return d


def _export(model_dir, out, **kw):
    res = export_bundle(ExportOptions(model_dir, out, verify_per_family=60, **kw), progress=None)
    assert res.verification is not None and res.verification.ok, res.verification.table()
    return res


@pytest.mark.parametrize("cut", [0, 2])
def test_hf_architectures_export_and_verify(llava_checkpoint, cut, tmp_path):
    arch, directory = llava_checkpoint
    res = _export(directory, tmp_path / "b", cut=cut, levels=4)
    m = BundleManifest.load(tmp_path / "b")
    assert m.cut == cut and m.levels == 4 and m.fingerprint == res.manifest.fingerprint
    roles = {(g.role, g.variant) for g in m.graphs}
    assert ("prefill", "fp32") in roles and ("prefill", "int8") in roles
    assert (("decode", "fp32") in roles) == (cut > 0)
    # a plain checkpoint's code_dim is the LLM's hidden size, and the device loads the bundle
    assert m.code_dim == m.hidden_size and m.entropy_model is not None
    from edgeqtl.device_agent.client import DeviceClient

    DeviceClient(tmp_path / "b")
    if cut:
        row = next(r for r in res.verification.rows if r.graph == "decode/fp32")
        assert row.agreement >= 0.999  # token by token through the bundle's own KV cache


def test_tiny_at_cut_0_exports_and_verifies(tmp_path):
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitModel
    from edgeqtl.models.checkpoint import save_checkpoint

    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=3)), tmp_path / "m")
    res = _export(tmp_path / "m", tmp_path / "b")
    assert res.manifest.cut == 0 and res.manifest.levels == 3
    assert [g.role for g in res.manifest.graphs] == ["prefill", "prefill"]


def test_tiny_bundle_and_standalone_server_half(tiny_dir, tmp_path):
    res = _export(tiny_dir, tmp_path / "b")
    m = res.manifest
    assert m.cut == 2 and m.text.image_token_count == 4
    assert {g.file for g in m.graphs} >= {"client_prefill.onnx", "client_prefill.int8.onnx", "client_decode.onnx"}
    server = load_server_half(tmp_path / "b" / m.server_dir)
    assert server.fingerprint == m.fingerprint
    model = load_split_model(tiny_dir)
    assert not any("vision" in k or "embed" in k for k in server.server.state_dict())
    codes = torch.randint(0, 4, (2, 9, m.code_dim), dtype=torch.uint8)
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(server.server(codes, mask), model.server(codes, mask), atol=1e-5)


def test_export_cli_prints_sizes_and_table(tiny_dir, tmp_path):
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_dir), "--out", str(tmp_path / "b"),
                                  "--verify-per-family", "10"])
    assert r.exit_code == 0, r.output
    assert "client_prefill.int8.onnx" in r.output and "agreement" in r.output and "KiB" in r.output


def test_trained_split_cannot_be_exported_at_another_cut(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="trained split at cut 2"):
        export_bundle(ExportOptions(tiny_dir, tmp_path / "b", cut=1), progress=None)


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        BundleManifest.load(tmp_path / "none")
    with pytest.raises(BundleError, match="not an edgeqtl bundle"):
        BundleManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        BundleManifest.load(tmp_path)


def test_export_help_has_example():
    r = CliRunner().invoke(main, ["export", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--target" in r.output


def test_unsupported_model_is_one_clear_line(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig, Qwen2Config

    cfg = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                              sliding_window=4, max_window_layers=0,
                                              layer_types=["sliding_attention"] * 2),
                      image_token_index=3)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    r = CliRunner().invoke(main, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "sliding-window" in lines[0], r.output


@pytest.mark.parametrize("target", ["cpu", "jetson"])
def test_external_data_bundle_lists_every_file_and_refuses_a_truncated_one(tiny_dir, tmp_path, monkeypatch, target):
    """The real-size way (external data for every variant), forced on the tiny preset by
    lowering the thresholds: every file is in the manifest with its size and sha256,
    every graph variant (fp16 included) loads in ONNX Runtime with its data file, and a
    truncated data file is refused by name before anything runs."""
    import onnxruntime as ort

    import edgeqtl.export.bundle as export_bundle_mod
    import edgeqtl.export.variants as variants
    from edgeqtl.bundle import file_sha256
    from edgeqtl.device_agent.client import DeviceClient

    monkeypatch.setattr(export_bundle_mod, "REAL_SIZE_BYTES", 0)
    monkeypatch.setattr(variants, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "b"
    res = export_bundle(ExportOptions(tiny_dir, out, target=target), progress=None)
    assert res.verification is not None and res.verification.ok, res.verification.table()
    m = BundleManifest.load(out)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert {f.name for f in m.files} == on_disk
    assert all(file_sha256(out / f.name) == f.sha256 and (out / f.name).stat().st_size == f.size for f in m.files)
    variants_seen = set()
    for g in m.graphs:
        assert g.data_files, f"{g.file} has no external data file"
        assert set(g.data_files) <= on_disk
        ort.InferenceSession(str(out / g.file), providers=["CPUExecutionProvider"])
        variants_seen.add(g.variant)
    assert variants_seen == ({"fp16"} if target == "jetson" else {"fp32", "int8"})
    m.check_files(out, hashes=True)

    victim = out / m.graphs[0].data_files[0]
    victim.write_bytes(victim.read_bytes()[:-16])
    with pytest.raises(BundleError, match=f"{victim.name} is .* bytes, the manifest says"):
        DeviceClient(out)
