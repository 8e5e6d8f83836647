"""Random-weight checkpoints of real published VLMs, built with transformers from their
configs (nothing is downloaded), for the real-size benchmarks and tests: the shapes of
the model, its tokenizer's special tokens, its chat template and its image processor's
settings are the published ones; the weights and the tokenizer's ordinary vocabulary
are not (a small byte-level BPE padded to the real vocabulary size). Random weights show
cost (time, memory, bytes), never accuracy.

    build(name, directory, scale=1.0)   e.g. build("llava-interleave-qwen-0.5b", "ckpt/")

`scale` < 1 shrinks widths and depths for fast tests while keeping the structure.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

# The chat template of llava-hf/llava-interleave-qwen-0.5b-hf (chat_template.json): the
# image before the text, ChatML turns.
INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# The chat template of HuggingFaceTB/SmolVLM-256M-Instruct (chat_template.json): one
# <|im_start|>, "User:"/"Assistant:" turns ending in <end_of_utterance>.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# ChatML with the image first and a newline after it, the form of LLaVA-OneVision's
# prompts (its published template puts a space after the role in a turn and a newline in
# the generation prompt, which does not reduce to fixed strings: models/chat_template.py).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    config: dict  # config.json
    specials: dict[str, int]  # special token -> id
    base_vocab: int  # ordinary tokens: ids 0 .. base_vocab - 1
    chat_template: str
    preprocessor: dict
    generation: dict
    tokenizer_extra: dict  # tokenizer_config.json fields (eos_token, pad_token, ...)
    processor: dict = dataclasses.field(default_factory=dict)  # processor_config.json


SPECS = {
    # llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP so400m at 384 px (26 layers, 729 tokens),
    # Qwen1.5-0.5B-Chat trunk (24 layers, hidden 1024, 16 heads), 864M parameters.
    "llava-interleave-qwen-0.5b": Spec(
        family="llava",
        config={
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 151646,
            "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "text_config": {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816,
                            "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
                            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "vocab_size": 152000,
                            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
                            "rms_norm_eps": 1e-6},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
                              "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                              "layer_norm_eps": 1e-6, "num_attention_heads": 16, "num_hidden_layers": 26,
                              "patch_size": 14, "vision_use_head": False}},
        specials={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646},
        base_vocab=151643,
        chat_template=INTERLEAVE_TEMPLATE,
        preprocessor={"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
                      "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
                      "size": {"height": 384, "width": 384}},
        generation={"bos_token_id": 151643, "eos_token_id": 151645},
        tokenizer_extra={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                         "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768},
        processor={"image_token": "<image>", "num_additional_image_tokens": 0, "patch_size": 14,
                   "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "full"}),
}

_SMOLVLM_VISION = {"model_type": "idefics3_vision", "hidden_act": "gelu_pytorch_tanh", "hidden_size": 768,
                   "image_size": 512, "intermediate_size": 3072, "layer_norm_eps": 1e-6, "num_attention_heads": 12,
                   "num_hidden_layers": 12, "patch_size": 16}
_SMOLVLM_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<global-img>": 49152,
                     **{f"<row_{r}_col_{c}>": 49153 + 6 * (r - 1) + c - 1 for r in range(1, 7) for c in range(1, 7)},
                     "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279}
_SMOLVLM_PRE = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": 512},
                "processor_class": "Idefics3Processor", "resample": 1, "rescale_factor": 1 / 255,
                "size": {"longest_edge": 2048}}


def _smolvlm(text: dict) -> Spec:
    return Spec(
        family="smolvlm",
        config={"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
                "image_token_id": 49190, "scale_factor": 4, "tie_word_embeddings": False,
                "text_config": {"model_type": "llama", "vocab_size": 49280, "max_position_embeddings": 8192,
                                "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": False,
                                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **text},
                "vision_config": dict(_SMOLVLM_VISION)},
        specials=_SMOLVLM_SPECIALS, base_vocab=49152, chat_template=SMOLVLM_TEMPLATE, preprocessor=_SMOLVLM_PRE,
        generation={"bos_token_id": 1, "eos_token_id": 49279, "pad_token_id": 2},
        tokenizer_extra={"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
                         "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer", "model_max_length": 8192},
        processor={"image_seq_len": 64, "processor_class": "Idefics3Processor"})


# HuggingFaceTB/SmolVLM-256M-Instruct: SigLIP-B/16 at 512 px (12 layers, 64 tokens after
# the 4x pixel shuffle), SmolLM2-135M trunk (30 layers, hidden 576, 9 heads, 3 kv heads).
SPECS["smolvlm-256m"] = _smolvlm({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                  "num_attention_heads": 9, "num_key_value_heads": 3})
# HuggingFaceTB/SmolVLM-500M-Instruct: the same tower, SmolLM2-360M trunk (32 layers,
# hidden 960, 15 heads, 5 kv heads, head_dim 64).
SPECS["smolvlm-500m"] = _smolvlm({"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                                  "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64})
# HuggingFaceTB/SmolVLM2-256M-Video-Instruct: SmolVLM-256M's shapes as `model_type: smolvlm`.
SPECS["smolvlm2-256m"] = dataclasses.replace(SPECS["smolvlm-256m"], config={
    **SPECS["smolvlm-256m"].config, "architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm",
    "vision_config": {**_SMOLVLM_VISION, "model_type": "smolvlm_vision"}},
    preprocessor={**_SMOLVLM_PRE, "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor"},
    processor={"image_seq_len": 64, "processor_class": "SmolVLMProcessor"})
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf, base view only (no any-resolution tiling):
# SigLIP so400m at 384 px (729 tokens + the image newline), Qwen2-0.5B trunk (24 layers,
# hidden 896, 14 heads, 2 kv heads).
SPECS["llava-onevision-qwen2-0.5b"] = Spec(
    family="llava_onevision",
    config={"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "image_token_index": 151646, "video_token_index": 151647, "projector_hidden_act": "gelu",
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384]],
            "tie_word_embeddings": True,
            "text_config": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "vocab_size": 152000,
                            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
                            "rms_norm_eps": 1e-6},
            "vision_config": dict(SPECS["llava-interleave-qwen-0.5b"].config["vision_config"])},  # the same SigLIP
    specials={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
              "<video>": 151647},
    base_vocab=151643,
    chat_template=ONEVISION_TEMPLATE,
    preprocessor={**SPECS["llava-interleave-qwen-0.5b"].preprocessor,
                  "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor"},
    generation={"bos_token_id": 151643, "eos_token_id": 151645},
    tokenizer_extra={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                     "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768})


def names() -> list[str]:
    return sorted(SPECS)


def _scaled(config: dict, scale: float) -> dict:
    """Widths and depths times `scale` (heads kept dividing the width), for tests."""
    if scale == 1.0:
        return config
    out = json.loads(json.dumps(config))
    for key in ("text_config", "vision_config"):
        c = out[key]
        heads = max(1, int(c["num_attention_heads"] * scale))
        head_dim = max(8, c["hidden_size"] // c["num_attention_heads"])
        c["num_attention_heads"] = heads
        if "num_key_value_heads" in c:
            ratio = max(1, config[key]["num_attention_heads"] // config[key]["num_key_value_heads"])
            c["num_key_value_heads"] = max(1, heads // ratio)
            c["num_attention_heads"] = c["num_key_value_heads"] * ratio
        c["hidden_size"] = c["num_attention_heads"] * head_dim
        c["intermediate_size"] = max(16, int(c["intermediate_size"] * scale))
        c["num_hidden_layers"] = max(2, int(c["num_hidden_layers"] * scale))
    return out


def _corpus() -> list[str]:
    """Text for the small BPE: plain English questions and answers."""
    words = ("what is in the image describe color shape how many objects are there left right above below "
             "a an the of and on with red green blue yellow circle square triangle person dog cat car tree house "
             "yes no one two three four five six seven eight nine ten picture photo scene shows").split()
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(12)) + " ?" for i in range(400)] + \
        [" ".join(words), "Describe the image.", "What is shown here?"]


def tokenizer_json(spec: Spec) -> str:
    """A byte-level BPE trained on a small corpus, padded to the real ordinary vocabulary
    (and any gap below the last special token) with never-produced filler tokens, and the
    real special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    d = json.loads(tok.to_str())
    # The learned tokens take the ordinary ids in order, stepping over the ids of special
    # tokens that sit among them (SmolLM2's <|endoftext|> is 0); then never-produced filler.
    # The specials are in the model's vocabulary too, at their ids: `tokenizers` gives an
    # added token the id its model has for it, else the next free one.
    special_ids = set(spec.specials.values())
    free = (i for i in range(max(spec.base_vocab, max(special_ids) + 1)) if i not in special_ids)
    vocab = {t: next(free) for t, _ in sorted(d["model"]["vocab"].items(), key=lambda x: x[1])}
    for i in free:
        vocab[f"<|fill_{i}|>"] = i  # in the vocabulary, never produced by a merge
    vocab.update(spec.specials)
    d["model"]["vocab"] = vocab
    d["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in sorted(spec.specials.items(),
                                                                                   key=lambda x: x[1])]
    return json.dumps(d)


def build(name: str, directory: str | Path, scale: float = 1.0, seed: int = 0, dtype=torch.float32) -> Path:
    """Write a random-weight checkpoint of `name` to `directory` (HF format, safetensors)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .hf import quiet_transformers

    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(names())}")
    spec = SPECS[name]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_dict = _scaled(spec.config, scale)
    (directory / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    quiet_transformers()
    cfg = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(directory, safe_serialization=True)
    del model
    (directory / "tokenizer.json").write_text(tokenizer_json(spec))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {**spec.tokenizer_extra, "added_tokens_decoder": {str(i): {"content": t, "special": True}
                                                          for t, i in spec.specials.items()}}, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": spec.chat_template}))
    (directory / "preprocessor_config.json").write_text(json.dumps(spec.preprocessor, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(spec.generation, indent=2))
    if spec.processor:
        (directory / "processor_config.json").write_text(json.dumps(spec.processor, indent=2))
    return directory
