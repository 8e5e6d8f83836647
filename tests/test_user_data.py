"""Training, adaptation, evaluation and split training on a user's own data files
(LLaVA records): the whole path from a file on disk, on the tiny preset."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgeqtl import data as records
from edgeqtl import shapes
from edgeqtl.cli import main


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    """The shapes world written as data files, as `edgeqtl data export` writes them."""
    d = tmp_path_factory.mktemp("shapes-data")
    r = CliRunner().invoke(main, ["data", "export", "--world", "shapes", "--out", str(d), "--train-samples", "120",
                                  "--heldout-per-family", "4"])
    assert r.exit_code == 0, r.output
    return d


def _one_line_error(r, *needles):
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code != 0 and lines and lines[-1].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[-1], r.output


def test_export_writes_the_world_as_records(world_files):
    train = records.check_records(records.load_records(world_files / "train.json")).records
    held = records.check_records(records.load_records(world_files / "heldout.json")).records
    assert len(train) == 120 and len(held) == 4 * len(shapes.FAMILIES)
    first = shapes.heldout(4)[0]
    assert held[0].answers == [first.answer] and first.question in held[0].prompt
    assert held[0].category == first.family
    assert (Image.open(held[0].image).convert("RGB").tobytes() == Image.fromarray(first.image).tobytes())


def test_tiny_trains_from_scratch_on_a_file_with_a_vocabulary_from_it(world_files, tmp_path):
    # a word the shapes world never uses, in the user's own data
    rows = json.loads((world_files / "train.json").read_text())[:40]
    rows[0]["conversations"][1]["value"] = "zebra"
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    (tmp_path / "images").symlink_to(world_files / "images")
    out = tmp_path / "model"
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(tmp_path / "mine.json"), "--eval-data",
                                  str(world_files / "heldout.json"), "--steps", "6", "--vision-steps", "2",
                                  "--batch-size", "8", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("zebra") is not None
    r = CliRunner().invoke(main, ["eval", "--model", str(out), "--data", str(world_files / "heldout.json"),
                                  "--json", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and report["records"] == 4 * len(shapes.FAMILIES)
    assert set(report["per_category"]) == set(shapes.FAMILIES)
    assert all(set(v) == {"accuracy", "records"} for v in report["per_category"].values())


def test_bad_records_stop_training_with_one_line_and_skip_bad_counts(world_files, tmp_path):
    rows = json.loads((world_files / "train.json").read_text())[:10]
    rows[3]["image"] = "images/nowhere.png"
    rows[5]["conversations"][0]["value"] = rows[5]["conversations"][0]["value"].replace("<image>", "")
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    (tmp_path / "images").symlink_to(world_files / "images")
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "bad.json"), "--steps", "1", "--vision-steps", "0",
            "--batch-size", "4", "--out", str(tmp_path / "m"), "--quiet"]
    r = CliRunner().invoke(main, args)
    _one_line_error(r, "2 of 10 records are bad", "train-000003", "image not found", "train-000005", "--skip-bad")
    r = CliRunner().invoke(main, args + ["--skip-bad"])
    assert r.exit_code == 0, r.output
    assert "8 of 10 records kept, 2 bad ones skipped" in r.output
    (tmp_path / "broken.json").write_text('[\n{"id": 1,\n')
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(tmp_path / "broken.json"),
                                  "--out", str(tmp_path / "m2")])
    _one_line_error(r, "broken.json:", "not valid JSON")


def test_quantizer_adaptation_keeps_the_vlm_frozen_and_answers_unanswered_records(world_files, tmp_path):
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.checkpoint import save_checkpoint

    base = tmp_path / "fp16"
    save_checkpoint(SplitModel(build_tiny(1), SplitConfig(quantizer="fp16")), base)
    rows = json.loads((world_files / "train.json").read_text())[:24]
    for row in rows[::2]:
        del row["conversations"][1]  # no answer: the unsplit model answers
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "images").symlink_to(world_files / "images")
    out = tmp_path / "adapted"
    r = CliRunner().invoke(main, ["train", "--model", str(base), "--bits", "2", "--data", str(tmp_path / "train.json"),
                                  "--eval-data", str(world_files / "heldout.json"), "--steps", "4", "--batch-size",
                                  "6", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "12 answered by the unsplit model" in r.output and "s per step" in r.output and "peak RSS" in r.output
    before, after = load_split_model(base), load_split_model(out)
    assert after.split.quantizer == "fsq" and after.split.levels == 4
    assert after.split.exact_text  # at cut 0 the trunk keeps the text's own embeddings
    frozen = {k: v for k, v in before.hf.state_dict().items()}
    for k, v in after.hf.state_dict().items():
        assert torch.equal(v, frozen[k]), f"{k} changed: the VLM must stay frozen"
    r = CliRunner().invoke(main, ["eval", "--model", str(out), "--data", str(world_files / "heldout.json"),
                                  "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert 0.0 <= json.loads((tmp_path / "e.json").read_text())["agreement"] <= 1.0
    r = CliRunner().invoke(main, ["train", "--model", str(base), "--bits", "2", "--out", str(tmp_path / "x")])
    _one_line_error(r, "--data")


SERVER_WITH_AUDIT = textwrap.dedent("""
    # The training server, recording every file it opens (Python's audit hook).
    import sys
    log = open(sys.argv[1], "w", buffering=1)
    sys.addaudithook(lambda event, args: log.write(f"{args[0]}\\n") if event == "open" else None)
    from edgeqtl.cli import main
    sys.argv = ["edgeqtl", *sys.argv[2:]]
    main()
""")


def test_a_device_trains_on_its_own_file_which_the_server_never_reads(world_files, tmp_path, mosquitto):
    from edgeqtl.device_agent.links import RetryingLink
    from edgeqtl.models.device_training import DeviceTrainer, RecordBatches, run_device
    from edgeqtl.models.batches import Collator, image_spec_of
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel, fingerprint
    from edgeqtl.models.steps import SplitTrainConfig
    from edgeqtl.transport import BrokerConfig, RequestClient

    model_dir = tmp_path / "start"
    save_checkpoint(SplitModel(build_tiny(2), SplitConfig(cut=0, levels=4)), model_dir)
    local = tmp_path / "device-data"
    local.mkdir()
    rows = json.loads((world_files / "train.json").read_text())[:16]
    (local / "clinic.json").write_text(json.dumps(rows))
    (local / "images").symlink_to(world_files / "images")
    audit, log = tmp_path / "opened.txt", tmp_path / "server.log"
    cmd = [sys.executable, "-c", SERVER_WITH_AUDIT, str(audit), "server", "train", "--model", str(model_dir),
           "--broker", f"mqtt://127.0.0.1:{mosquitto.port}", "--steps", "3", "--batch-size", "4", "--threads", "1"]
    with log.open("w") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 90
        while "training server on" not in log.read_text():
            assert server.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        model = load_split_model(model_dir)
        cfg = SplitTrainConfig(steps=3, batch_size=4, checkpoint_every=100, warmup=1)
        prompts = load_prompts(model_dir, model)
        data = records.check_records(records.load_records(local / "clinic.json")).records
        trainer = DeviceTrainer(model, RecordBatches(Collator(prompts, image_spec_of(model)), data, 4), cfg,
                                "clinic-1", fingerprint=bytes.fromhex(fingerprint(model))[:16])
        with RequestClient(BrokerConfig(port=mosquitto.port), "clinic-1") as t:
            run_device(trainer, RetryingLink(t, timeout=5, retries=10))
        assert trainer.step == 3
    finally:
        server.terminate()
        server.wait(20)
    opened = audit.read_text()
    assert str(model_dir) in opened  # the hook did record the server's own reads
    assert "clinic.json" not in opened and "device-data" not in opened and "train-0000" not in opened
