"""Shared fixtures: small HF Llava checkpoints built from config and saved to disk,
with the shapes benchmark's tokenizer beside them (so that they export and verify)."""
from __future__ import annotations

import os
import time

# Under pytest-xdist (the README's `-n 2`) each worker gets one torch thread (and so do
# the CLI processes the tests start): two workers of two threads on two cores spin
# against each other. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from edgeqtl import shapes

IMAGE_TOKEN_ID = shapes.vocabulary().index(shapes.IMAGE_TOKEN)

ARCHS = ("siglip-qwen2", "clip-llama")


def llava_config(arch: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    if arch == "siglip-qwen2":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8, vision_use_head=False)
        text = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1,
                           vision_feature_select_strategy="full", image_seq_length=16)
    if arch == "clip-llama":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        text = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                           tie_word_embeddings=False)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=16)
    raise ValueError(arch)


def save_llava_checkpoint(directory, arch: str, seed: int = 0):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = llava_config(arch)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    shapes.save_tokenizer(directory, image_token_count=16)
    return model


@pytest.fixture(scope="session", params=ARCHS)
def llava_checkpoint(request, tmp_path_factory):
    """(arch, directory) of a small random Llava checkpoint saved with safetensors."""
    d = tmp_path_factory.mktemp(request.param)
    save_llava_checkpoint(d, request.param)
    return request.param, d


@pytest.fixture
def mosquitto():
    """A mosquitto broker on a free loopback port, stopped after the test."""
    from edgeqtl.broker import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory):
    """get(suite) -> (Section, out_dir): `edgeqtl bench SUITE --quick` on the tiny preset,
    run on first request, all suites sharing one output directory (and so the models the
    first one trained)."""
    from edgeqtl.bench import suite as bench_suite
    from edgeqtl.bench.report import BenchContext, write_section_json

    out = tmp_path_factory.mktemp("bench")
    ctx = BenchContext(out=out, quick=True, progress=False, echo=lambda line: None)
    done = {}

    def get(name: str):
        if name not in done:
            t0 = time.time()
            section = bench_suite(name).run(ctx)
            section.seconds = time.time() - t0
            write_section_json(ctx, section)
            done[name] = section
        return done[name], out

    return get
