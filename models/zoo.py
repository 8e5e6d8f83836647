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
    with never-produced filler tokens, then the real special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    for i in range(len(vocab), spec.base_vocab):
        vocab[f"<|fill_{i}|>"] = i  # in the vocabulary, never produced by a merge
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
