"""The built-in benchmark worlds, by name: what a checkpoint records as its "world" and
what `--world` options take.

    shapes   64 px, black, up to four shapes on a 2x2 grid; 5 families (the tiny preset's)
    scenes   128 px, 0-9 shapes at free positions, sizes and rotations over photographs and
             textures, digits on some; 7 families (the small preset's)

Both are modules with one API (checked below, at import, so that a world missing a piece
fails here rather than deep inside a training run). Torch-free.
"""
from __future__ import annotations

from types import ModuleType

from edgeqtl import scenes, shapes

WORLDS: dict[str, ModuleType] = {"shapes": shapes, "scenes": scenes}

# What training, evaluation, export and the demo use of a world.
API = ("IMAGE_SIZE", "FAMILIES", "CHAT", "train_batch", "heldout", "vocabulary", "build_tokenizer", "prompts",
       "answer_word")

for _name, _module in WORLDS.items():
    _missing = [a for a in API if not hasattr(_module, a)]
    if _missing:
        raise ImportError(f"world {_name!r} ({_module.__name__}) lacks {', '.join(_missing)}")


def get_world(name: str | None) -> ModuleType:
    """The world called `name`; None (a checkpoint that records none) is the shapes world."""
    if name is None:
        return shapes
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown world {name!r}; the built-in worlds are {', '.join(WORLDS)}") from None


def name_of(world: ModuleType) -> str:
    return world.__name__.rsplit(".", 1)[-1]
