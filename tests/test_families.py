"""Every supported VLM family (models/families), from a small random-weight checkpoint
that transformers writes from the published config (models/zoo.py, nothing downloaded):
the split without a quantizer gives the HF model's own logits at cut 0 and at a cut
inside the trunk; a 2-bit split exports and verifies; and the torch-free device agent's
answer over a real mosquitto is the in-process answer, token for token."""
from __future__ import annotations

import pytest
import torch

from edgeqtl import shapes
from edgeqtl.models.split import SplitConfig

NEVER = 10 ** 9  # an end id no model produces: every answer runs to its length

# name in the zoo: (the cut it is exported at, the zoo's scale); between them cuts 0, 1 and 2
FAMILIES = {"smolvlm-256m": (1, 0.05), "smolvlm2-256m": (2, 0.1), "llava-onevision-qwen2-0.5b": (0, 0.05)}


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


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_splits_exactly_exports_verifies_and_answers_over_mosquitto(name, tmp_path, mosquitto):
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models import zoo
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.transport import BrokerConfig, RequestClient

    cut, scale = FAMILIES[name]
    ckpt = zoo.build(name, tmp_path / "hf", scale=scale)
    for c in sorted({0, max(cut, 1)}):
        identity_split_matches_hf(ckpt, c)

    model = load_split_model(ckpt, SplitConfig(cut=cut, levels=4))
    # the fresh quantizer kept for the in-process answer, with the checkpoint's own tokenizer and chat
    save_checkpoint(model, tmp_path / "model", prompts=load_prompts(ckpt, model))
    result = export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify_per_family=1), progress=None)
    assert result.verification is not None and result.verification.ok, result.verification
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
