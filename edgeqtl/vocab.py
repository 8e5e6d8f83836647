"""Word-level tokenizers for models trained from scratch (the tiny and small presets, and
a tiny model trained on a user's own data): one token per lower-cased word or
punctuation mark, plus the special tokens. Built locally with `tokenizers`; the device
loads the saved tokenizer.json like any other."""
from __future__ import annotations

from typing import Iterable

PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<unk>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, IMAGE_TOKEN)


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def words_of(texts: Iterable[str]) -> set[str]:
    """Every word and punctuation mark of `texts`, as the tokenizer will split them
    (the image marker and the special tokens aside)."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return words


def word_tokenizer(words: Iterable[str]):
    """A `tokenizers.Tokenizer`: the special tokens first (ids 0-3), then the words sorted."""
    from tokenizers import Tokenizer, models, normalizers

    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + sorted(set(words) - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def prompt_encoder(tokenizer, image_token_count: int, chat):
    """A word-level model's PromptEncoder: `tokenizer` (from word_tokenizer), its chat
    format, the image token repeated image_token_count times."""
    from .prompt import PromptEncoder

    return PromptEncoder(tokenizer, chat, IMAGE_TOKEN, image_token_count, tokenizer.token_to_id(PAD_TOKEN),
                         tokenizer.token_to_id(EOS_TOKEN))
