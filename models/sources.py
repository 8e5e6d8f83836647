"""Where training batches come from, for the in-process recipe (models/training.py):

    WorldSource   a built-in world's endless stream (edgeqtl.worlds): deterministic per
                  seed and step (shapes: with the object-count curriculum), and the scene
                  description beside every image (the stage-1 probe reads it)
    RecordSource  a user's LLaVA records (edgeqtl.data): batch `step` draws, for each
                  slot of the family mix, a record of that category, from a generator
                  seeded by (seed, step), so a resumed run sees the same batches

Both give `align_batch(step)` (stage 1, a stream of its own) and `batch(step, mix)`
(stage 2; `mix` is the category of each slot, from the loss-adaptive sampler) as Batches.
"""
from __future__ import annotations

import numpy as np

from edgeqtl import shapes

from .batches import Batch, Collator, record_example


class WorldSource:
    has_scenes = True  # samples carry their objects: the cell probe can read them

    def __init__(self, collate: Collator, cfg, world=shapes):
        self.collate, self.cfg, self.world = collate, cfg, world
        self.categories = tuple(world.FAMILIES)
        self.name = world.__name__.rsplit(".", 1)[-1]  # recorded with the model: eval and export use it
        # Only the shapes world ramps its object count (the scenes world draws its own).
        self.curriculum = world is shapes and cfg.curriculum_steps > 0
        if world is not shapes and cfg.curriculum_steps > 0:
            raise ValueError(f"the {self.name} world has no object-count curriculum; train with "
                             "--curriculum-steps 0")

    @classmethod
    def for_model(cls, model, cfg, world=shapes, tokenizer=None) -> "WorldSource":
        """The world's stream, tokenised with its own tokenizer and chat format."""
        from .batches import image_spec_of

        return cls(Collator(world.prompts(model.num_image_tokens, tokenizer), image_spec_of(model)), cfg, world)

    def align_batch(self, step: int) -> Batch:
        cfg = self.cfg
        return self.collate(self.world.train_batch(cfg.seed, step, cfg.batch_size, stream=3))  # a stream of its own

    def batch(self, step: int, mix) -> Batch:
        from .training import max_objects_at

        cfg = self.cfg
        ramp = {"max_objects": max_objects_at(step, cfg)} if self.curriculum else {}
        return self.collate(self.world.train_batch(cfg.seed, step, cfg.batch_size, families=tuple(mix), **ramp))


class RecordSource:
    has_scenes = False
    name = None  # a user's data: export wants --calibration-data

    def __init__(self, collate: Collator, records, cfg, workers: int = 4):
        from edgeqtl.data import RecordLoader

        self.collate, self.cfg = collate, cfg
        self.by_category: dict[str, list] = {}
        for r in records:
            self.by_category.setdefault(r.category or "all", []).append(r)
        self.categories = tuple(sorted(self.by_category))
        self.loader = RecordLoader(records, cfg.batch_size, seed=cfg.seed, workers=workers)

    def _draw(self, rng: np.random.Generator, mix) -> Batch:
        picked = [self.by_category[c][int(rng.integers(len(self.by_category[c])))] for c in mix]
        return self.collate([record_example(r, image) for r, image in self.loader.decode(picked)])

    def align_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, 3, step])
        return self._draw(rng, [self.categories[i % len(self.categories)] for i in range(self.cfg.batch_size)])

    def batch(self, step: int, mix) -> Batch:
        bs = self.cfg.batch_size  # slot i takes mix[(step * bs + i) % len(mix)], as the worlds' streams do
        slots = [mix[(step * bs + i) % len(mix)] for i in range(bs)]
        return self._draw(np.random.default_rng([self.cfg.seed, 1, step]), slots)
