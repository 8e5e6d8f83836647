"""Every supported VLM family (models/families), from a small random-weight checkpoint
that transformers writes from the published config (models/zoo.py, nothing downloaded):
the split without a quantizer gives the HF model's own logits at cut 0 and at a cut
inside the trunk; a 2-bit split exports and verifies; and the torch-free device agent's
answer over a real mosquitto is the in-process answer, token for token."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from edgeqtl import shapes
from edgeqtl.models.split import SplitConfig

NEVER = 10 ** 9  # an end id no model produces: every answer runs to its length

# name in the zoo: (the cut it is exported at, the zoo's scale)
FAMILIES = {"smolvlm-256m": (1, 0.05), "llava-onevision-qwen2-0.5b": (0, 0.05)}


def hf_logits(model, ids, mask, pix):
    """The HF model's own forward, given its images the way its processor would."""
    family = model.family.name
    if family == "smolvlm":  # (batch, images, 3, H, W): one 512 px view, no splitting
        return model.hf(input_ids=ids, attention_mask=mask, pixel_values=pix.unsqueeze(1)).logits
    if family == "llava_onevision":
        # One untiled view per image plus the newline: transformers' multi-image path,
        # which it takes when a sample holds several images (batch_num_images).
        size = pix.shape[-1]
        return model.hf(input_ids=ids, attention_mask=mask, pixel_values=pix.unsqueeze(1),
                        image_sizes=torch.tensor([[size, size]] * len(pix)), batch_num_images=[len(pix)]).logits
    return model.hf(input_ids=ids, attention_mask=mask, pixel_values=pix).logits


def identity_split_matches_hf(directory, cut: int):
    from edgeqtl.models.load import load_split_model

    model = load_split_model(directory, SplitConfig(cut=cut, quantizer="identity"))
    n, image_id = model.num_image_tokens, model.parts.image_token_id
    g = torch.Generator().manual_seed(cut)
    ids = torch.randint(3, 1000, (2, n + 12), generator=g)
    ids[:, 4:4 + n] = image_id
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    size = model.family.image_size(model.hf.config)
    pix = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        ref = hf_logits(model, ids, mask, pix)
        ours = model.server(model.client(ids, mask, pix).wire, mask)
        other = hf_logits(model, ids, mask, pix * 0.5)
    valid = mask.bool()
    assert (ours - ref)[valid].abs().max().item() < 1e-4, (directory.name, cut)
    assert (other - ref)[valid].abs().max().item() > 1e-3  # the image reaches the logits


def exports_verifies_and_answers(ckpt, cut: int, tmp_path, mosquitto):
    """A 2-bit split of `ckpt` exports and verifies, and the torch-free device agent's
    answer over mosquitto is the in-process answer of the same split, token for token."""
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.transport import BrokerConfig, RequestClient

    model = load_split_model(ckpt, SplitConfig(cut=cut, levels=4))
    # the fresh quantizer kept for the in-process answer, with the checkpoint's own tokenizer and chat
    save_checkpoint(model, tmp_path / "model", prompts=load_prompts(ckpt, model))
    result = export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify_per_family=1), progress=None)
    assert result.verification is not None and result.verification.ok, result.verification.table()
    assert result.manifest.text.image_token_count == model.num_image_tokens

    model = load_split_model(tmp_path / "model")
    engine = load_engine(tmp_path / "bundle" / "server")
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=3)
    cfg = BrokerConfig(port=mosquitto.port)
    s = shapes.heldout(1)[0]
    with ServerAgent(engine, cfg), RequestClient(cfg, f"pi-{model.family.name}") as t:
        answer = DeviceClient(tmp_path / "bundle").ask(t, s.image, s.question)
    batch = Collator(load_prompts(tmp_path / "model", model), image_spec_of(model))([world_example(s)],
                                                                                    with_answer=False)
    assert answer.token_ids == generate(model, batch, 3, {NEVER})[0] and len(answer.token_ids) == 3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_splits_exactly_exports_verifies_and_answers_over_mosquitto(name, tmp_path, mosquitto):
    from edgeqtl.models import zoo

    cut, scale = FAMILIES[name]
    ckpt = zoo.build(name, tmp_path / "hf", scale=scale)
    for c in sorted({0, max(cut, 1)}):
        identity_split_matches_hf(ckpt, c)
    exports_verifies_and_answers(ckpt, cut, tmp_path, mosquitto)


def test_smolvlm2_is_the_smolvlm_family_and_splits_exactly():
    """SmolVLM2 (`model_type: smolvlm`) has SmolVLM's layout under other class names: the
    same family file, checked at cut 0 and cut 2 (its export is SmolVLM's, tested above)."""
    import tempfile
    from pathlib import Path

    from edgeqtl.models import zoo

    with tempfile.TemporaryDirectory() as d:
        ckpt = zoo.build("smolvlm2-256m", Path(d) / "hf", scale=0.1)
        for cut in (0, 2):
            identity_split_matches_hf(ckpt, cut)


# --------------------------------------------------------------------------- TinyLLaVA Factory

TEXT = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "bos_token_id": 500, "eos_token_id": 500}
VISION = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "image_size": 64, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
          "layer_norm_eps": 1e-6}


def write_tinyllava_checkpoint(d):
    """A checkpoint in TinyLLaVA Factory's layout, from its documented names (not its
    code): `language_model.` a Qwen2ForCausalLM (tied, so no lm_head saved),
    `vision_tower._vision_tower.vision_model.` a SiglipVisionModel with its head,
    `connector._connector.{0,2}.` Linear-GELU-Linear; a diff-only config.json; a tokenizer
    without <image>. Returns the three modules, for the reference forward."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from edgeqtl.models import zoo

    d.mkdir(parents=True)
    torch.manual_seed(3)
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in TEXT.items() if k != "model_type"})).eval()
    tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})).eval()
    connector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    state = {f"language_model.{k}": v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    for k, v in tower.state_dict().items():
        state["vision_tower._vision_tower." + (k if k.startswith("vision_model.") else "vision_model." + k)] = v
    state.update({f"connector._connector.{k}": v for k, v in connector.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    diff_only = lambda c, drop: {k: v for k, v in c.items() if k not in drop}  # noqa: E731
    (d / "config.json").write_text(json.dumps({
        "architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
        "connector_type": "mlp2x_gelu", "hidden_size": 64, "image_aspect_ratio": "square", "image_token_index": -200,
        "llm_model_name_or_path": "Qwen/Qwen2-0.5B", "pad_token": "<|endoftext|>", "pad_token_id": 500,
        "text_config": {**diff_only(TEXT, ("tie_word_embeddings",)), "_name_or_path": "Qwen/Qwen2-0.5B",
                        "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
        "vision_config": {**VISION, "model_name_or_path": "google/siglip-so400m-patch14-384"},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "patch",
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384"}))
    spec = dataclasses.replace(zoo.SPECS["llava-interleave-qwen-0.5b"], base_vocab=500, specials={"<|endoftext|>": 500})
    (d / "tokenizer.json").write_text(zoo.tokenizer_json(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 500, "eos_token_id": 500}))
    return llm, tower, connector


def test_a_tinyllava_factory_checkpoint_converts_and_passes_the_same_checks(tmp_path, mosquitto):
    from click.testing import CliRunner

    from edgeqtl.cli import main
    from edgeqtl.models.load import load_prompts, load_split_model

    llm, tower, connector = write_tinyllava_checkpoint(tmp_path / "tinyllava")
    run = CliRunner().invoke(main, ["convert", "--model", str(tmp_path / "tinyllava"), "--out", str(tmp_path / "hf")])
    assert run.exit_code == 0, run.output
    model = load_split_model(tmp_path / "hf", SplitConfig(cut=1, quantizer="identity"))
    assert model.num_image_tokens == (64 // 16) ** 2 - 1  # "patch" drops SigLIP's first patch, as TinyLLaVA does
    prompts = load_prompts(tmp_path / "hf", model)
    assert prompts.render([("user", "what is it ?")])[0].startswith("A chat between a curious user")
    assert prompts.chat.assistant == "ASSISTANT:" and prompts.eos_token_id == 500

    # TinyLLaVA's own forward, from its source: hidden_states[-2] without the first token,
    # the connector, spliced where the -200 placeholder was.
    before, after = torch.tensor([[7, 8, 9]]), torch.tensor([[10, 11, 12, 13]])
    pix = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = connector(tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:])
        emb = llm.get_input_embeddings()
        ref = llm(inputs_embeds=torch.cat([emb(before), feats, emb(after)], dim=1)).logits
        n = model.num_image_tokens
        ids = torch.cat([before, torch.full((1, n), model.parts.image_token_id), after], dim=1)
        mask = torch.ones_like(ids)
        ours = model.server(model.client(ids, mask, pix).wire, mask)
    assert (ours - ref).abs().max().item() < 1e-4
    exports_verifies_and_answers(tmp_path / "hf", 0, tmp_path, mosquitto)


def test_convert_refuses_what_it_cannot_map(tmp_path):
    from edgeqtl.models.families.tinyllava import ConvertError, convert

    write_tinyllava_checkpoint(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, "connector_type": "resampler"}))
    with pytest.raises(ConvertError, match="resampler"):
        convert(tmp_path / "t", tmp_path / "out")
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ConvertError, match="not a TinyLLaVA one"):
        convert(tmp_path / "t", tmp_path / "out")


def test_smolvlm_prompt_ids_and_pixels_match_its_hf_processor(tmp_path):
    """The torch-free prompt encoder and image preprocessing give SmolVLM's own processor's
    token ids (the image wrapped in its markers) and pixel values (the longest edge to
    2048 first, then the 512 px square; splitting off). LLaVA-OneVision's processor needs
    torchvision, which is not installed, so only its token count is checked (above)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from edgeqtl.imageproc import preprocess
    from edgeqtl.models import zoo
    from edgeqtl.models.load import load_image_spec, load_prompts, load_split_model

    ckpt = zoo.build("smolvlm-256m", tmp_path / "hf", scale=0.05)
    model = load_split_model(ckpt, SplitConfig(cut=0, levels=4))
    processor = AutoProcessor.from_pretrained(ckpt)
    question = "what colour is the square on the left ?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    hf = processor(images=[image], text=text, return_tensors="np", do_image_splitting=False)
    ids, mask = load_prompts(ckpt, model).encode([question])
    assert ids[0][mask[0] == 1].tolist() == hf["input_ids"][0].tolist()
    assert int((ids[0] == model.parts.image_token_id).sum()) == model.num_image_tokens == 64
    np.testing.assert_allclose(preprocess([image], load_image_spec(ckpt, model)), hf["pixel_values"][0], atol=1e-5)


def test_smolvlm_image_splitting_matches_its_processor_and_answers_over_mosquitto(tmp_path, mosquitto):
    """--image-splitting: the device's tiles, global view and prompt ids are SmolVLM's
    processor's with splitting on; the split without a quantizer fed them gives the HF
    model's logits; a 2-bit bundle sends (rows x cols + 1) x 64 image codes, which the
    server takes from the request, and answers over mosquitto."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models import zoo
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.tiling import split_image, tiles_text
    from edgeqtl.transport import BrokerConfig, RequestClient

    ckpt = zoo.build("smolvlm-256m", tmp_path / "hf", scale=0.05)
    model = load_split_model(ckpt, SplitConfig(cut=0, quantizer="identity"))
    prompts, spec = load_prompts(ckpt, model), model.family.tile_spec(model)
    processor = AutoProcessor.from_pretrained(ckpt)
    question = "what is written on the sign ?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    hf = processor(images=[image], text=text, return_tensors="np", do_image_splitting=True)
    pix, rows, cols = split_image(image, model.image_spec, spec)
    assert (rows, cols) == (3, 4) and pix.shape == hf["pixel_values"][0].shape == (13, 3, 512, 512)
    np.testing.assert_allclose(pix, hf["pixel_values"][0], atol=1e-5)
    ids, mask = prompts.encode([question], tiles_text(rows, cols, prompts.image_token, spec), rows * cols * 64)
    assert ids[0].tolist() == hf["input_ids"][0].tolist()

    tids = torch.from_numpy(ids)
    with torch.no_grad():
        ref = model.hf(input_ids=tids, attention_mask=torch.from_numpy(mask),
                       pixel_values=torch.from_numpy(hf["pixel_values"])).logits
        feats = model.client.image_features(torch.from_numpy(pix)).reshape(1, -1, model.hidden_size)
        is_image = tids == model.parts.image_token_id
        h = model.client.embed_tokens(torch.where(is_image, 0, tids))
        h[is_image] = feats[0]
        ours = model.server.forward_hidden(h, torch.from_numpy(mask))
    assert (ours - ref).abs().max().item() < 1e-4

    fsq = load_split_model(ckpt, SplitConfig(cut=0, levels=4))
    save_checkpoint(fsq, tmp_path / "model", prompts=load_prompts(ckpt, fsq))
    export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify=False, image_splitting=True),
                  progress=None)
    engine = load_engine(tmp_path / "bundle" / "server")
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=2)
    cfg = BrokerConfig(port=mosquitto.port)
    client, plain = DeviceClient(tmp_path / "bundle"), DeviceClient(tmp_path / "bundle", reuse_images=False)
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-tiles") as t:
        first = client.ask(t, image, question)
        again = client.ask(t, image, "and in the corner ?")
        whole = plain.ask(t, image, "and in the corner ?")
    image_bytes = 13 * 64 * fsq.split.code_dim * 2 / 8  # 13 views' codes at 2 bits, packed
    assert len(first.token_ids) == 2 and first.bytes_up > image_bytes
    assert again.image_by_reference and again.token_ids == whole.token_ids and again.bytes_up < 0.2 * first.bytes_up
    from edgeqtl.models.load import CheckpointError

    with pytest.raises(CheckpointError, match="needs cut 0 with prompt ids"):
        export_bundle(ExportOptions(tmp_path / "model", tmp_path / "nope", verify=False, image_splitting=True,
                                    prompt_ids=False), progress=None)


def test_onevision_base_view_pixels_are_its_image_processors_untiled_ones(tmp_path):
    """An untiled image (transformers' multi-image path) is padded to a square in the mean
    colour, then resized: the device's pixels equal LLaVA-OneVision's (PIL) image processor's."""
    import numpy as np
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from edgeqtl.imageproc import preprocess
    from edgeqtl.models import zoo
    from edgeqtl.models.load import load_image_spec, load_split_model

    ckpt = zoo.build("llava-onevision-qwen2-0.5b", tmp_path / "hf", scale=0.05)
    model = load_split_model(ckpt, SplitConfig(cut=0, levels=4))
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(ckpt)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    hf = processor([[image, image]], return_tensors="np")  # two images in one sample: neither is tiled
    np.testing.assert_allclose(preprocess([image], load_image_spec(ckpt, model))[0], hf["pixel_values"][0, 0],
                               atol=1e-5)


def test_onevision_any_resolution_matches_its_processor_and_model_and_answers(tmp_path, mosquitto):
    """--image-splitting on LLaVA-OneVision: the device's base view and tiles are its image
    processor's, its layout index gives the HF model's own logits (tiles laid out as one
    grid, padding cropped, a newline per row), and a 2-bit bundle answers over mosquitto."""
    import numpy as np
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models import zoo
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.tiling import anyres_index, anyres_views
    from edgeqtl.transport import BrokerConfig, RequestClient

    ckpt = zoo.build("llava-onevision-qwen2-0.5b", tmp_path / "hf", scale=0.05)
    model = load_split_model(ckpt, SplitConfig(cut=0, quantizer="identity"))
    spec, prompts = model.family.tile_spec(model), load_prompts(ckpt, model)
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(ckpt)
    for size in [(300, 700), (500, 260)]:  # (height, width): a 1 x 2 and a 2 x 1 grid
        image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
        hf = processor([image], return_tensors="np")
        pix, rows, cols = anyres_views(image, model.image_spec, spec)
        assert pix.shape == hf["pixel_values"][0].shape and rows * cols == 2
        np.testing.assert_allclose(pix, hf["pixel_values"][0], atol=1e-5)
        index = anyres_index(*size, rows, cols, spec)
        extra = len(index) - prompts.image_token_count
        ids, mask = prompts.encode(["what is it ?"], prompts.image_token * extra, extra)
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.no_grad():
            ref = model.hf(input_ids=tids, attention_mask=tmask, pixel_values=torch.from_numpy(hf["pixel_values"]),
                           image_sizes=torch.tensor([size])).logits
            wire = model.client.tiled_image_wire(torch.from_numpy(pix), torch.from_numpy(index)).wire
            is_image = tids == model.parts.image_token_id
            h = model.client.embed_tokens(torch.where(is_image, 0, tids))
            h[is_image] = wire[0]
            ours = model.server.forward_hidden(h, tmask)
        assert (ours - ref).abs().max().item() < 1e-4, size

    fsq = load_split_model(ckpt, SplitConfig(cut=0, levels=4))
    save_checkpoint(fsq, tmp_path / "model", prompts=load_prompts(ckpt, fsq))
    res = export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify_per_family=1,
                                      image_splitting=True), progress=None)
    assert res.verification.ok, res.verification.table()
    engine = load_engine(tmp_path / "bundle" / "server")
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=2)
    cfg = BrokerConfig(port=mosquitto.port)
    small = Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-anyres") as t:
        answer = DeviceClient(tmp_path / "bundle").ask(t, small, "what is it ?")
    assert len(answer.token_ids) == 2
