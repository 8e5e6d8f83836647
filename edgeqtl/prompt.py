"""Conversations -> token ids, the one way training, export and the device all do it.
Torch-free (tokenizers + numpy).

A checkpoint's chat template (a Jinja program in its tokenizer or processor config) is
reduced at export to a `ChatFormat`: a few strings the device applies with `tokenizers`
alone, no transformers and no Jinja on the device.

    rendered = prefix + user(turn 1) + assistant + answer(turn 2) + user(turn 3) + ...
               (+ assistant at the end when the last turn is the user's: the generation prompt)

The image goes where the first user turn's `<image>` marker is; without a marker,
before or after that turn's text (`image_first`), joined by `image_separator`. It is
written as the image token repeated once per image token. The answer's tokens, found
through the tokenizer's character offsets (so that merges across the boundary cannot
shift them), are the labels of training.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EdgeqtlError

IMAGE_MARKER = "<image>"
IGNORE = -100  # label of a position without loss (edgeqtl.wire.IGNORE_LABEL)
USER, ASSISTANT = "user", "assistant"


class PromptError(EdgeqtlError, ValueError):
    """A prompt or conversation the chat format or tokenizer cannot encode."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    user: str  # one user turn, "{text}" where its text goes
    assistant: str  # what opens the assistant's turn; generation starts after it
    answer: str  # an assistant turn, "{text}" where its text goes, then what ends the turn
    prefix: str = ""  # before the first turn (a system prompt, a BOS text)
    image_first: bool = True  # where the image goes when the user's text has no <image> marker
    image_separator: str = "\n"  # between the image and the text in that case
    user_next: str | None = None  # a later user turn, where it differs from the first (None: `user`)
    image_wrap: str = "{image}"  # around the image tokens (SmolVLM: <fake_token_around_image><global-img>...)

    def __post_init__(self):
        for name in ("user", "answer", "user_next"):
            value = getattr(self, name)
            if value is not None and value.count("{text}") != 1:
                raise PromptError(f"chat format: {name} must hold '{{text}}' exactly once")
        if self.image_wrap.count("{image}") != 1:
            raise PromptError("chat format: image_wrap must hold '{image}' exactly once")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChatFormat":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_template(cls, template: str, answer: str = " {text}</s>") -> "ChatFormat":
        """From a one-turn Python format string with {image} and {prompt} (the form edgeqtl
        saved before chat formats), e.g. "USER: {image}\\n{prompt} ASSISTANT:"."""
        try:
            i_img, i_txt = template.index("{image}"), template.index("{prompt}")
        except ValueError:
            raise PromptError(f"chat template {template!r} must hold {{image}} and {{prompt}}") from None
        first, second = sorted([(i_img, "{image}"), (i_txt, "{prompt}")])
        start, end = first[0], second[0] + len(second[1])
        return cls(user=template[:start] + "{text}", assistant=template[end:], answer=answer,
                   image_first=i_img < i_txt, image_separator=template[first[0] + len(first[1]):second[0]])

    # ---------------------------------------------------------------- rendering
    def render(self, turns: Sequence[tuple[str, str]], image: str,
               wrapped: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, answer spans): the conversation as one string, and the character span
        of each assistant turn's text and end (what training puts its loss on). `turns`
        alternate (role, text) from the user; `image` replaces the first user turn's
        marker (or is joined to its text), inside `image_wrap` unless it is `wrapped` already."""
        out, spans = [self.prefix], []
        for i, (role, text) in enumerate(turns):
            if (role == USER) != (i % 2 == 0):
                raise PromptError(f"turn {i + 1} is {role!r}: turns alternate user, assistant, ... from the user")
            if role == USER:
                if i == 0:
                    text = self.place_image(text, image if wrapped else self.image_wrap.replace("{image}", image))
                template = self.user if i == 0 or self.user_next is None else self.user_next
                out.append(template.replace("{text}", text))
                out.append(self.assistant)
            else:
                start = len("".join(out))
                out.append(self.answer.replace("{text}", text))
                spans.append((start, len("".join(out))))
        return "".join(out), spans

    def place_image(self, text: str, image: str) -> str:
        if IMAGE_MARKER in text:
            return text.replace(IMAGE_MARKER, image, 1)
        return image + self.image_separator + text if self.image_first else text + self.image_separator + image


@dataclasses.dataclass
class Encoded:
    """A left-padded batch: ids and mask (B, T); labels (B, T) with IGNORE where no loss."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


class PromptEncoder:
    """A tokenizer plus the chat format, image token and its count of one model."""

    def __init__(self, tokenizer, chat: ChatFormat, image_token: str, image_token_count: int, pad_token_id: int,
                 eos_token_id: int | None = None):
        self.tok = tokenizer
        self.chat = chat
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise PromptError(f"the tokenizer has no token {image_token!r} for the image")
        self.image_token_count = image_token_count
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_spec(cls, tokenizer, text) -> "PromptEncoder":
        """From a bundle's TextSpec (edgeqtl.bundle)."""
        return cls(tokenizer, text.chat, text.image_token, text.image_token_count, text.pad_token_id,
                   text.eos_token_id)

    @classmethod
    def from_bundle(cls, directory: str | Path, text) -> "PromptEncoder":
        """From a bundle's TextSpec and the tokenizer file beside it."""
        from tokenizers import Tokenizer

        return cls.from_spec(Tokenizer.from_file(str(Path(directory) / text.tokenizer_file)), text)

    @classmethod
    def load(cls, directory: str | Path, image_token_count: int) -> "PromptEncoder":
        """From a model directory's tokenizer.json and edgeqtl_chat.json (save())."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        chat = load_chat(directory)
        if chat is None or not (directory / "tokenizer.json").is_file():
            raise PromptError(f"{directory} has no tokenizer.json and {CHAT_FILE} beside the checkpoint")
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        ids = {k: tok.token_to_id(chat[k]) for k in ("pad_token", "eos_token")}
        return cls(tok, chat["chat"], chat["image_token"], image_token_count, ids["pad_token"], ids["eos_token"])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        save_chat(directory, self.chat, self.image_token, self.tok.id_to_token(self.pad_token_id),
                  self.tok.id_to_token(self.eos_token_id))

    def render(self, turns: Sequence[tuple[str, str]], tiles: str = "") -> tuple[str, list[tuple[int, int]]]:
        """tiles: a split image's tiles' text (edgeqtl.tiling), before its global view."""
        image = self.chat.image_wrap.replace("{image}", self.image_token * self.image_token_count)
        return self.chat.render(turns, tiles + image, wrapped=True)

    def encode_conversations(self, conversations: Sequence[Sequence[tuple[str, str]]], tiles: str = "",
                             tile_tokens: int = 0) -> Encoded:
        """Each conversation's ids, with labels on its assistant turns, left padded.
        tiles, tile_tokens: a split image's tiles' text and image tokens (edgeqtl.tiling)."""
        rendered = [self.render(turns, tiles) for turns in conversations]
        encs = self.tok.encode_batch([text for text, _ in rendered])
        seqs, labels = [], []
        for (text, spans), turns, e in zip(rendered, conversations, encs):
            ids = list(e.ids)
            n = ids.count(self.image_token_id)
            if n != self.image_token_count + tile_tokens:
                raise PromptError(f"prompt {turns[0][1][:40]!r} yields {n} image tokens, expected "
                                  f"{self.image_token_count + tile_tokens}: write {IMAGE_MARKER!r} at most once, where the image "
                                  "goes, and no image token of your own")
            lab = [IGNORE] * len(ids)
            for k, (a, b) in enumerate(e.offsets):
                if b > a and any(s <= a and b <= t for s, t in spans):
                    lab[k] = ids[k]
            seqs.append(ids)
            labels.append(lab)
        T = max(map(len, seqs))
        out = Encoded(np.full((len(seqs), T), self.pad_token_id, np.int64), np.zeros((len(seqs), T), np.int64),
                      np.full((len(seqs), T), IGNORE, np.int64))
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            out.input_ids[i, T - len(s):] = s
            out.attention_mask[i, T - len(s):] = 1
            out.labels[i, T - len(s):] = lab
        return out

    def encode(self, prompts: Sequence[str], tiles: str = "", tile_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One user turn each, ending in the generation prompt -> (input_ids, attention_mask)."""
        enc = self.encode_conversations([[(USER, p)] for p in prompts], tiles, tile_tokens)
        return enc.input_ids, enc.attention_mask

    def count_tokens(self, turns: Sequence[tuple[str, str]]) -> int:
        return len(self.tok.encode(self.render(turns)[0]).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_token_id])


# --------------------------------------------------------------------------- beside a checkpoint

CHAT_FILE = "edgeqtl_chat.json"  # not tokenizer_config.json: transformers reads its chat_template as Jinja


def save_chat(directory: str | Path, chat: ChatFormat, image_token: str, pad_token: str, eos_token: str) -> Path:
    """The chat settings a trained split model carries beside its tokenizer.json."""
    import json

    path = Path(directory) / CHAT_FILE
    path.write_text(json.dumps({"chat": chat.to_dict(), "image_token": image_token, "pad_token": pad_token,
                                "eos_token": eos_token}, indent=2))
    return path


def load_chat(directory: str | Path) -> dict | None:
    """{"chat": ChatFormat, "image_token", "pad_token", "eos_token"} from a model directory,
    or None if it has none. Files written before chat formats hold a one-turn template."""
    import json

    path = Path(directory) / CHAT_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    if "chat" in d:
        d["chat"] = ChatFormat.from_dict(d["chat"])
    else:
        d["chat"] = ChatFormat.from_template(d["chat_template"], answer=f" {{text}} {d.get('eos_token', '</s>')}")
    return d
