"""Visual token reduction on the device (models/reduce.py): each reducer keeps K tokens
in their original order and says where they sat, the kept positions travel with the
image and the server builds the same position steps the device used, the reduced
client exports to ONNX and verifies against PyTorch, one server half answers bundles
with different K (it takes the count from each request), and training records the
reducer for export."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgeqtl import shapes
from edgeqtl.models.reduce import ImageReduction, TokenReducer, divprune, pool_centres, visionzip
from edgeqtl.models.split import SplitConfig, UnsupportedModelError, position_ids_from_mask, position_mask
from edgeqtl.wire import FrameKind, ImageRef, InferOptions, ProtocolError, new_request_id

NEVER = 10 ** 9


def _rows_of(out: torch.Tensor, x: torch.Tensor) -> list[int]:
    """For each output row, the index of the equal input row."""
    return [int((x[0] - row).abs().sum(-1).argmin()) for row in out[0]]


@pytest.mark.parametrize("reducer", ["divprune", "random"])
def test_selecting_reducers_keep_input_tokens_in_their_order(reducer):
    x = torch.randn(1, 36, 8)
    out, positions = TokenReducer(ImageReduction(reducer, 9), 36, 6)(x)
    rows = _rows_of(out, x)
    assert out.shape == (1, 9, 8) and rows == sorted(set(rows)) and len(rows) == 9
    assert torch.equal(out[0], x[0, rows])
    assert positions[0].tolist() == rows  # each kept token keeps its own position
    _, none = TokenReducer(ImageReduction(reducer, 9, positions="consecutive"), 36, 6)(x)
    assert none is None


def test_random_is_seeded():
    keep = lambda seed: TokenReducer(ImageReduction("random", 9, seed), 36, 6).keep.tolist()  # noqa: E731
    assert keep(0) == keep(0) and keep(0) != keep(1) and keep(0) == sorted(keep(0))


def test_divprune_keeps_one_of_each_duplicate_group():
    base = torch.randn(4, 16)
    x = base.repeat_interleave(5, dim=0)[None]  # 4 distinct tokens, 5 copies each
    idx = divprune(x, 4)[0].tolist()
    assert sorted(i // 5 for i in idx) == [0, 1, 2, 3]  # one per group, never two copies


def test_pooling_averages_blocks_of_the_grid():
    x = torch.arange(36 * 2, dtype=torch.float32).view(1, 36, 2)
    out, positions = TokenReducer(ImageReduction("pool", 9), 36, 6)(x)
    grid = x[0].view(6, 6, 2)
    assert torch.allclose(out[0, 0], grid[:2, :2].reshape(-1, 2).mean(0))
    assert torch.allclose(out[0, 8], grid[4:, 4:].reshape(-1, 2).mean(0))
    assert positions[0].tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]  # each 2 x 2 cell's centre, rounded down
    assert pool_centres(27, 8).tolist() == sorted(set(pool_centres(27, 8).tolist()))


def test_visionzip_keeps_the_most_attended_tokens_and_merges_the_rest():
    x = torch.randn(1, 20, 4)
    attn = torch.zeros(1, 2, 20, 20)
    attn[..., [3, 7, 11, 15, 19, 1, 5]] = 1.0  # every query looks at these
    out, positions = visionzip(x, attn, 8)  # 7 dominant + 1 contextual
    assert torch.equal(out[0, :7], x[0, [1, 3, 5, 7, 11, 15, 19]])
    rest = [i for i in range(20) if i not in (1, 3, 5, 7, 11, 15, 19)]
    assert torch.allclose(out[0, 7], x[0, rest].mean(0), atol=1e-6)  # one target: all the rest merged
    assert positions[0].tolist() == [1, 3, 5, 7, 11, 15, 19, 0]  # the contextual token at its target's, rest[0]
    ordered, at = visionzip(x, attn, 8, in_order=True)  # original positions: sorted in by position
    assert at[0].tolist() == [0, 1, 3, 5, 7, 11, 15, 19] and torch.equal(ordered[0, 0], out[0, 7])


def test_position_steps_put_kept_tokens_where_they_were():
    # [pad, text, 3 of an image's 9 tokens (kept: 1, 4, 7), text, text]
    is_image = torch.tensor([[False, False, True, True, True, False, False]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    steps = position_mask(mask, is_image, torch.tensor([[1, 4, 7]]), span=9)
    assert steps.tolist() == [[0, 1, 2, 3, 3, 2, 1]]
    # the image starts at 1: its kept tokens at 1 + 1, 1 + 4, 1 + 7; the text after it at 1 + 9
    assert position_ids_from_mask(steps, 7).tolist() == [[0, 0, 2, 5, 8, 10, 11]]
    assert position_mask(mask, torch.zeros_like(is_image), torch.tensor([[1, 4, 7]]), 9).tolist() == mask.tolist()


def test_kept_positions_travel_as_a_bit_map_and_bad_ones_are_refused():
    ref = ImageRef(5, 4, "ab" * 32, span=729, kept=(0, 5, 100, 728))
    sent = ref.to_json()
    assert len(sent["kept"]) == 124  # 729 bits, base64
    assert InferOptions.from_json({"image": sent}).image == ref
    for bad in ({**sent, "kept": sent["kept"][:-4]}, {**sent, "kept": "!" * 124}, {**sent, "span": 3},
                {**sent, "tokens": 5}, {k: v for k, v in sent.items() if k != "span"}):
        with pytest.raises(ProtocolError):
            InferOptions.from_json({"image": bad})
    with pytest.raises(ProtocolError, match="distinct ascending"):
        ImageRef(0, 2, "ab" * 32, span=9, kept=(4, 4))


def test_saved_reductions_from_before_positions_stay_consecutive():
    old = {"reducer": "divprune", "tokens": 64, "seed": 0}
    assert ImageReduction.from_dict(old).positions == "consecutive"
    assert ImageReduction.from_dict(ImageReduction("pool", 64).to_dict()).positions == "original"


def test_bad_reductions_are_one_clear_line():
    with pytest.raises(UnsupportedModelError, match="square"):
        TokenReducer(ImageReduction("pool", 10), 36, 6)
    with pytest.raises(UnsupportedModelError, match="connector merges them"):
        TokenReducer(ImageReduction("attention", 8), 64, 8, tower_attention=False)
    with pytest.raises(UnsupportedModelError, match="1 to 729"):
        ImageReduction.parse("800", None, 729)
    with pytest.raises(UnsupportedModelError, match="--image-tokens"):
        ImageReduction.parse(None, "pool", 729)
    with pytest.raises(UnsupportedModelError, match="--reducer must be one of"):
        ImageReduction.parse("64", "zip", 729)
    assert ImageReduction.parse("0.125", None, 729) == ImageReduction("divprune", 91)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from edgeqtl.models import zoo
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.load import load_prompts, load_split_model

    d = tmp_path_factory.mktemp("reduce")
    hf = zoo.build("llava-onevision-qwen2-0.5b", d / "hf", scale=0.05)
    model = load_split_model(hf, SplitConfig(cut=0, levels=4))
    save_checkpoint(model, d / "model", prompts=load_prompts(hf, model))  # one quantizer for every bundle
    return d


def test_reduced_bundles_verify_and_one_server_answers_every_k(onevision, mosquitto):
    from edgeqtl.bundle import BundleManifest
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.transport import BrokerConfig, RequestClient

    d = onevision
    full = load_split_model(d / "model")
    runs = {}
    for reducer, k in [("divprune", 16), ("pool", 9), ("attention", 24), ("random", 8)]:  # four K, one server
        res = export_bundle(ExportOptions(d / "model", d / reducer, verify_per_family=1, image_tokens=str(k),
                                          reducer=reducer), progress=None)
        assert res.verification.ok, res.verification.table()
        m = BundleManifest.load(d / reducer)
        assert m.text.image_token_count == k + 1 and m.image_reduction["reducer"] == reducer  # + the newline
        assert m.fingerprint == fingerprint(full)  # the server half is the unreduced model's
        variants = {g.variant for g in m.graphs}
        assert variants == ({"fp32", "int8"} if reducer in ("pool", "random") else {"fp32"})  # int8 flips a choice
        runs[reducer] = k

    assert len(set(runs.values())) == 4
    engine = load_engine(d / "divprune" / "server")  # serves every K
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=3)
    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-reduce") as t:
        answers = {name: DeviceClient(d / name).ask(t, s.image, s.question) for name in runs}
        again = DeviceClient(d / "divprune")
        first, second = (again.ask(t, s.image, s.question) for _ in range(2))
    # one prefill batch of prompts of different lengths (left-padded), each with its own kept positions,
    # answers each as it is answered alone
    qs = shapes.heldout(2)[:4]
    frames = lambda: [DeviceClient(d / name).request_frame(q.image, q.question) for name, q in zip(runs, qs)]  # noqa: E731
    assert len({len(q.question.split()) for q in qs}) > 1
    together, alone = engine.handle_batch(frames()), [engine.handle(f) for f in frames()]
    assert [f.json()["token_ids"] for f in together] == [f.json()["token_ids"] for f in alone]
    # the second question names the image by reference, its kept positions sent again: the same answer
    assert second.image_by_reference and not first.image_by_reference
    assert second.token_ids == first.token_ids == answers["divprune"].token_ids
    for reducer, k in runs.items():
        model = load_split_model(d / "model", reduction=ImageReduction(reducer, k))
        batch = Collator(load_prompts(d / "model", model), image_spec_of(model))([world_example(s)], with_answer=False)
        assert answers[reducer].token_ids == generate(model, batch, 3, {NEVER})[0]
        # the server's position steps, from the kept positions the device sent, are the ones PyTorch used
        frame = DeviceClient(d / reducer).request_frame(s.image, s.question)
        assert InferOptions.from_json(frame.parts()[-1].json()).image.span == full.num_image_tokens  # 729 and the newline
        steps = model.client(batch.input_ids, batch.attention_mask, batch.pixel_values).attention_mask
        assert torch.equal(engine._prompt(frame)[3], steps) and steps.max() > 1
        every_image_token = full.num_image_tokens * full.split.code_dim * 2 / 8  # 730 tokens' codes, packed
        assert answers[reducer].bytes_up < 0.2 * every_image_token  # K + 1 of them go, with the prompt's ids


def test_training_records_the_reducer_and_export_uses_it(tmp_path):
    from edgeqtl.cli import main
    from edgeqtl.models.load import load_split_model

    out = tmp_path / "tiny"
    run = CliRunner().invoke(main, ["train", "--preset", "tiny", "--bits", "2", "--steps", "2", "--vision-steps", "0",
                                    "--probe", "none", "--image-tokens", "2", "--reducer", "random", "--out", str(out),
                                    "--quiet"])
    assert run.exit_code == 0, run.output
    assert json.loads((out / "edgeqtl_split.json").read_text())["image_reduction"]["tokens"] == 2
    assert load_split_model(out).num_image_tokens == 2
    refused = CliRunner().invoke(main, ["train", "--preset", "tiny", "--steps", "2", "--image-tokens", "2",
                                        "--out", str(tmp_path / "x"), "--quiet"])
    assert refused.exit_code != 0 and "--probe none" in refused.output


def test_a_reduced_bundle_at_cut_2_decodes_with_the_kept_positions(tmp_path, mosquitto):
    """At cut > 0 the device's own layers use the position steps too, and its decode steps
    extend the prefill graph's position_mask: answers equal in-process PyTorch's."""
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitModel
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.transport import BrokerConfig, RequestClient

    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=2, levels=4)), tmp_path / "model")
    res = export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify_per_family=1, image_tokens="2",
                                      reducer="random"), progress=None)
    assert res.verification.ok, res.verification.table()  # prefill and decode graphs against PyTorch
    assert {"position_mask", "image_positions"} <= {o.name for o in res.manifest.graph("prefill").outputs}
    engine = load_engine(tmp_path / "bundle" / "server")
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=4)
    model = load_split_model(tmp_path / "model", reduction=ImageReduction("random", 2))
    collate = Collator(load_prompts(tmp_path / "model", model), image_spec_of(model))
    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-cut2") as t:
        client = DeviceClient(tmp_path / "bundle")
        for s in shapes.heldout(2)[:4]:
            answer = client.ask(t, s.image, s.question)
            expected = generate(model, collate([world_example(s)], with_answer=False), 4, {NEVER})[0]
            assert answer.token_ids == expected and answer.round_trips == 4
    # two sessions' decode steps in one pass (their caches and position steps padded together) give what
    # each gives alone: the same tokens, and the same logits at every step
    qs = shapes.heldout(2)[4:6]
    logits, plain = [], engine._logits
    engine._logits = lambda *a: logits.append(plain(*a)) or logits[-1]

    def tokens(batched: bool) -> list[list[int]]:
        started = [client._encode(q.image, q.question) for q in qs]
        rids = [new_request_id() for _ in qs]
        frames = [client.prompt_request(w, ids, InferOptions(), rid, kept=kept)[0]
                  for (w, ids, _, _, kept), rid in zip(started, rids)]
        state = [[m, past] for _, _, m, past, _ in started]
        out = [[] for _ in qs]
        for step in range(3):
            replies = engine.handle_batch(frames) if batched else [engine.handle(f) for f in frames]
            frames = []
            for i, reply in enumerate(replies):
                tok = reply.json()["token_id"]
                out[i].append(tok)
                wire, state[i][0], state[i][1] = client.encode_token(tok, *state[i])
                frames.append(client.frame(FrameKind.DECODE_STEP, wire, rids[i], step + 1))
        return out

    together = tokens(batched=True)
    batched_logits, logits[:] = torch.cat(logits), []
    assert together == tokens(batched=False)
    assert torch.allclose(batched_logits, torch.cat(logits), atol=1e-4)
