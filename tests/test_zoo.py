"""A random-weight checkpoint of a published VLM (models/zoo.py, at a small scale) is
read the way its own transformers processor reads it: the torch-free prompt encoder
gives the processor's exact token ids (chat template, image tokens expanded), and the
torch-free image preprocessing gives its pixel values."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeqtl.imageproc import preprocess
from edgeqtl.models.split import SplitConfig


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    from edgeqtl.models import zoo

    return zoo.build("llava-interleave-qwen-0.5b", tmp_path_factory.mktemp("zoo") / "interleave", scale=0.05)


def test_prompt_ids_and_pixels_match_the_hf_processor(interleave):
    from transformers import AutoProcessor

    from edgeqtl.models.load import load_image_spec, load_prompts, load_split_model

    model = load_split_model(interleave, SplitConfig(cut=0, levels=4))
    prompts = load_prompts(interleave, model)
    processor = AutoProcessor.from_pretrained(interleave)
    question = "what colour is the square on the left ?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))  # not square, not 384
    hf = processor(images=image, text=text, return_tensors="np")

    ids, mask = prompts.encode([question])
    assert ids[0][mask[0] == 1].tolist() == hf["input_ids"][0].tolist()
    assert int((hf["input_ids"][0] == model.parts.image_token_id).sum()) == model.num_image_tokens

    ours = preprocess([image], load_image_spec(interleave, model))
    assert ours.shape == hf["pixel_values"].shape
    np.testing.assert_allclose(ours, hf["pixel_values"], atol=1e-5)


def test_zoo_cli_lists_and_refuses_unknown_names(tmp_path):
    from click.testing import CliRunner

    from edgeqtl.cli import main

    listed = CliRunner().invoke(main, ["zoo"])
    assert listed.exit_code == 0 and "llava-interleave-qwen-0.5b" in listed.output
    bad = CliRunner().invoke(main, ["zoo", "no-such-vlm", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown model 'no-such-vlm'" in bad.output
