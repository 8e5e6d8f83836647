"""A checkpoint's chat template (Jinja, in chat_template.json or tokenizer_config.json)
reduced at export to a ChatFormat (edgeqtl.prompt): strings the device applies with
`tokenizers` alone. Done by rendering the template with transformers on probe
conversations and cutting the results where the probes' texts landed:

    U  user [image, "XQX"]
    A  U + the generation prompt
    B  U + assistant "YAY"
    C  B + user "ZQZ" + the generation prompt

U gives the first user turn (with whatever the template puts before it: a system
prompt, a BOS), A the generation prompt, B the assistant's turn, C a later user turn.
A template whose renderings do not nest that way is refused with a line saying so:
write edgeqtl_chat.json by hand then.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgeqtl.errors import EdgeqtlError
from edgeqtl.prompt import IMAGE_MARKER, ChatFormat


class ChatTemplateError(EdgeqtlError, ValueError):
    """A chat template that does not reduce to a ChatFormat."""


def find_template(directory: Path) -> str | None:
    """The checkpoint's chat template: chat_template.json (processor), chat_template.jinja,
    or tokenizer_config.json's `chat_template`."""
    directory = Path(directory)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, str) and template:
                return template
    jinja = directory / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def _render(template: str, messages: list[dict], add_generation_prompt: bool, specials: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **specials)
    return rendered[0]


def reduce_template(template: str, image_text: str = IMAGE_MARKER, specials: dict | None = None) -> ChatFormat:
    """`image_text`: what the template writes for an image (the processor expands it)."""
    specials = specials or {}
    user1 = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "XQX"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "YAY"}]}
    user2 = {"role": "user", "content": [{"type": "text", "text": "ZQZ"}]}
    try:
        u = _render(template, [user1], False, specials)
        a = _render(template, [user1], True, specials)
        b = _render(template, [user1, answer], False, specials)
        c = _render(template, [user1, answer, user2], True, specials)
    except Exception as e:  # noqa: BLE001 - a template error of the checkpoint's own
        raise ChatTemplateError(f"the chat template does not render ({type(e).__name__}: {e}); write "
                                "edgeqtl_chat.json beside the checkpoint instead") from None
    if u.count("XQX") != 1 or u.count(image_text) != 1 or not a.startswith(u) or not b.startswith(u):
        raise ChatTemplateError("the chat template's turns do not reduce to fixed strings; write edgeqtl_chat.json "
                                "beside the checkpoint instead")
    gen, reply = a[len(u):], b[len(u):]
    if not reply.startswith(gen) or reply.count("YAY") != 1:
        raise ChatTemplateError("the chat template's generation prompt is not where the assistant's turn starts; "
                                "write edgeqtl_chat.json beside the checkpoint instead")
    i_img, i_txt = u.index(image_text), u.index("XQX")
    lo, hi = min(i_img, i_txt), max(i_img + len(image_text), i_txt + 3)
    image_first = i_img < i_txt
    sep = u[i_img + len(image_text):i_txt] if image_first else u[i_txt + 3:i_img]
    later = None
    if c.startswith(b) and c.endswith(gen) and c.count("ZQZ") == 1:
        later = c[len(b):len(c) - len(gen)].replace("ZQZ", "{text}")
    return ChatFormat(user=u[:lo] + "{text}" + u[hi:], assistant=gen, answer=reply[len(gen):].replace("YAY", "{text}"),
                      image_first=image_first, image_separator=sep, user_next=later)
