"""What several suites need and share through the run's work directory: trained models,
their bundles, and the questions to ask. Everything is cached under out/work, so a second
suite (or a second run with the same --out) reuses the first one's models."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .report import BenchContext

# Quick mode trains for a smoke test only: the figures show the machinery, not the method.
QUICK_TRAIN = {"steps": 80, "vision_steps": 15, "curriculum_steps": 30}


@dataclasses.dataclass
class Question:
    image: np.ndarray  # (H, W, 3) uint8
    question: str
    answer: str | None
    category: str | None = None


def run_name(levels: int | None) -> str:
    return "fp16" if levels is None else f"{levels}lv"


def trained_model(ctx: BenchContext, levels: int | None, cut: int = 0) -> Path:
    """A model of the preset trained with `levels` quantizer levels (None: the 16-bit
    baseline) at `cut`, on the preset's world: trained once, then cached."""
    d = ctx.work(f"{ctx.preset}-{run_name(levels)}-cut{cut}")
    if (d / "edgeqtl_split.json").is_file():
        return d
    from edgeqtl.models import jobs
    from edgeqtl.models.presets import build_preset, get_preset
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.worlds import get_world

    spec = get_preset(ctx.preset)
    cfg = spec.train_config()
    if ctx.quick:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in QUICK_TRAIN.items()
                                          if not (k == "curriculum_steps" and cfg.curriculum_steps == 0)})
    split = SplitConfig(cut=cut, quantizer="fp16") if levels is None else SplitConfig(cut=cut, levels=levels)
    ctx.echo(f"  training the {ctx.preset} preset, {run_name(levels)}, cut {cut}, {cfg.steps} steps -> {d}")
    model = SplitModel(build_preset(spec, 0), split)
    jobs.train_world(model, cfg, d, lambda line: None, progress=ctx.progress, world=get_world(spec.world),
                     check=False)
    return d


def untrained_model(ctx: BenchContext, levels: int | None, cut: int = 0) -> Path:
    """The preset with fresh weights (seed 0) at `levels` and `cut`: for quick-mode figures
    that do not depend on what the model knows (time, bytes)."""
    d = ctx.work(f"{ctx.preset}-{run_name(levels)}-cut{cut}-untrained")
    if (d / "edgeqtl_split.json").is_file():
        return d
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_preset, get_preset
    from edgeqtl.models.split import SplitConfig, SplitModel

    spec = get_preset(ctx.preset)
    split = SplitConfig(cut=cut, quantizer="fp16") if levels is None else SplitConfig(cut=cut, levels=levels)
    save_checkpoint(SplitModel(build_preset(spec, 0), split), d, extra={"world": spec.world})
    return d


def bundle_of(ctx: BenchContext, model_dir: Path, target: str = "cpu", prompt_ids: bool | None = None) -> Path:
    """The device bundle of a model directory, exported once (no verification: the
    suites measure, `edgeqtl export` verifies). prompt_ids: export's own default (on at
    cut 0) unless given."""
    if ctx.bundle is not None and ctx.model is not None and Path(model_dir) == Path(ctx.model) and prompt_ids is None:
        return ctx.bundle
    form = "" if prompt_ids is None else ("-ids" if prompt_ids else "-codes")
    d = ctx.work(f"bundle-{Path(model_dir).name}-{target}{form}")
    if (d / "manifest.json").is_file():
        return d
    from edgeqtl.export.bundle import ExportOptions, export_bundle

    calibration = ctx.data if ctx.data is not None else None
    export_bundle(ExportOptions(Path(model_dir), d, target=target, verify=False, calibration_data=calibration,
                                prompt_ids=prompt_ids), progress=None)
    return d


def the_model(ctx: BenchContext, levels: int | None = 4, cut: int = 0) -> Path:
    """The user's --model when given, else the preset trained here."""
    return ctx.model if ctx.model is not None else trained_model(ctx, levels, cut)


def questions(ctx: BenchContext, n: int) -> list[Question]:
    """n questions with their answers: the user's records (--data), else the held-out set
    of the preset's world, families interleaved."""
    if ctx.data is not None:
        from edgeqtl.data import check_records, load_records, open_rgb

        records = check_records(load_records(ctx.data), skip_bad=True).records[:n]
        return [Question(np.asarray(open_rgb(r.image)), r.prompt, r.answers[0] if r.answers else None, r.category)
                for r in records]
    from edgeqtl.models.load import world_of
    from edgeqtl.models.presets import get_preset
    from edgeqtl.worlds import get_world

    world = world_of(ctx.model) if ctx.model is not None else get_world(get_preset(ctx.preset).world)
    k = len(world.FAMILIES)
    per = max(1, -(-n // k))
    held = world.heldout(per)
    order = [held[f * per + i] for i in range(per) for f in range(k)]  # interleaved: a prefix covers every family
    return [Question(s.image, s.question, s.answer, s.family) for s in order[:n]]
