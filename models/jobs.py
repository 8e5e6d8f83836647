"""The training and evaluation jobs `edgeqtl train` and `edgeqtl eval` run: load the
model and the data, check the data, run a recipe, evaluate, save, and say so.

    train_world     a preset from scratch on a built-in world (models/training.py)
    train_records   a preset from scratch on a user's records: the vocabulary is built
                    from the data, the probe redraws patches (no scene labels exist)
    adapt_records   a pretrained checkpoint, frozen, with a fresh quantizer adapted by
                    self-distillation on a user's records (models/adapt.py)
    eval_world / eval_records
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from edgeqtl import shapes
from edgeqtl.memory import peak_rss_mb
from edgeqtl.prompt import PromptEncoder

from .batches import Collator, image_spec_of, record_example
from .evaluation import RecordEvalReport, evaluate, evaluate_records
from .reduce import reduce_image_tokens
from .split import SplitConfig, SplitModel

Echo = Callable[[str], None]


@dataclasses.dataclass
class DataOptions:
    data: Path
    eval_data: Path | None = None
    image_root: Path | None = None
    skip_bad: bool = False
    max_new_tokens: int = 16


def checked(path: Path, opts: DataOptions, model: SplitModel, prompts: PromptEncoder, echo: Echo):
    """The good records of a data file, checked as training needs them: structure,
    images, and each whole conversation within the model's context."""
    from edgeqtl.data import check_records, load_records

    context = getattr(model.parts.decoder.config, "max_position_embeddings", None)
    report = check_records(load_records(path, opts.image_root), skip_bad=opts.skip_bad, max_prompt_tokens=context,
                           count_tokens=(lambda r: prompts.count_tokens([(t.role, t.text) for t in r.turns]))
                           if context else None)
    for line in report.faults:
        echo(f"skipped {line}")
    if report.faults:
        echo(report.summary())
    return report.records


def eos_ids(prompts: PromptEncoder, model: SplitModel) -> set[int]:
    ids = {prompts.eos_token_id} if prompts.eos_token_id is not None else set()
    cfg_eos = model.parts.decoder.config.eos_token_id
    ids |= set(cfg_eos) if isinstance(cfg_eos, (list, tuple)) else ({cfg_eos} if cfg_eos is not None else set())
    return ids


def record_batches(records, batch_size: int):
    """Evaluation batches of Examples, in file order, images decoded in threads."""
    from edgeqtl.data import RecordLoader

    for chunk in RecordLoader(records, batch_size).in_order():
        yield [record_example(r, image) for r, image in chunk]


def eval_records(model: SplitModel, prompts: PromptEncoder, records, max_new_tokens: int = 16,
                 batch_size: int = 32, with_agreement: bool = False, progress: bool = True) -> RecordEvalReport:
    from tqdm import tqdm

    bar = tqdm(total=len(records), desc="evaluate", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        return evaluate_records(model, Collator(prompts, image_spec_of(model)), record_batches(records, batch_size),
                                max_new_tokens, eos_ids(prompts, model), with_agreement, bar.update)
    finally:
        bar.close()


def eval_world(model: SplitModel, prompts: PromptEncoder, per_family: int, world=shapes):
    return evaluate(model, Collator(prompts, image_spec_of(model)), world.heldout(per_family))


# --------------------------------------------------------------------------- training jobs


def train_world(model: SplitModel, cfg, out: Path, echo: Echo, progress: bool = True, world=shapes,
                check: bool = True):
    """check: a quick held-out figure at the end (the bench, which measures its own, skips it)."""
    from .sources import WorldSource
    from .training import train

    source = WorldSource.for_model(model, cfg, world)
    train(model, source, cfg, out_dir=out, progress=progress, log=echo)
    if not check:
        return
    report = eval_world(model, source.collate.prompts, 100, world)
    echo(report.table("quick held-out check (100 per family; `edgeqtl eval` runs the full set):"))


def train_records(split: SplitConfig, cfg, opts: DataOptions, out: Path, echo: Echo, seed: int = 0,
                  progress: bool = True, preset=None, image_tokens=None, reducer=None):
    """A preset (default tiny) from scratch on a user's records: its word vocabulary is
    every word of every turn (and the chat format's), its chat format the shapes world's."""
    from edgeqtl.data import load_records
    from edgeqtl.vocab import word_tokenizer, words_of

    from .presets import PRESETS, build_preset
    from .sources import RecordSource
    from .training import train

    raw = [r for r in load_records(opts.data, opts.image_root) if hasattr(r, "turns")]
    chat = shapes.CHAT
    texts = [t.text for r in raw for t in r.turns] + [x.replace("{text}", " ") for x in (chat.user, chat.assistant,
                                                                                        chat.answer)]
    tokenizer = word_tokenizer(words_of(texts))
    vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    model = SplitModel(build_preset(preset or PRESETS["tiny"], seed, vocab=vocab), split)
    reduce_image_tokens(model, image_tokens, reducer)
    prompts = shapes.prompts(model.num_image_tokens, tokenizer)
    records = checked(opts.data, opts, model, prompts, echo)
    echo(f"{len(records)} records, a vocabulary of {len(vocab)} words from them")
    evaluator = _evaluator(model, prompts, opts, echo)
    source = RecordSource(Collator(prompts, image_spec_of(model)), records, cfg)
    train(model, source, cfg, out_dir=out, progress=progress, log=echo, evaluator=evaluator)
    if evaluator is not None:
        echo(f"held-out: {evaluator(model)}")
    return model


def adapt_records(model_dir: Path, split: SplitConfig, cfg, opts: DataOptions, out: Path, echo: Echo,
                  progress: bool = True, image_tokens=None, reducer=None):
    from edgeqtl.data import RecordLoader

    from .adapt import adapt
    from .load import load_prompts, load_split_model

    if split.cut == 0 and split.quantizer == "fsq":
        split = dataclasses.replace(split, exact_text=True)  # the trunk keeps the text's own embeddings
    model = load_split_model(model_dir, split)
    reduce_image_tokens(model, image_tokens, reducer)  # the device keeps K of each image's tokens
    prompts = load_prompts(model_dir, model)
    echo(f"adapting a {model.split.levels}-level quantizer to {model_dir} at cut {model.split.cut}, "
         f"{cfg.steps} steps -> {out}")
    records = checked(opts.data, opts, model, prompts, echo)
    answered = sum(r.has_answer for r in records)
    echo(f"{len(records)} records ({answered} with an answer, {len(records) - answered} answered by the unsplit "
         f"model); the VLM stays frozen, training: {', '.join(cfg.trainable)}")
    loader = RecordLoader(records, cfg.batch_size, seed=cfg.seed)
    batches = ([record_example(r, image) for r, image in chunk] for chunk in loader.stream())
    collate = Collator(prompts, image_spec_of(model))
    evaluator = _evaluator(model, prompts, opts, echo, with_agreement=True)
    adapt(model, collate, batches, cfg, eos_ids(prompts, model), out_dir=out, progress=progress, log=echo,
          on_eval=(lambda step: echo(f"step {step}: {evaluator(model)}")) if evaluator else None,
          eval_every=getattr(cfg, "eval_every", 0))
    if evaluator is not None:
        echo(f"held-out: {evaluator(model)}")
    echo(f"peak RSS {peak_rss_mb():.0f} MB")
    return model


def _evaluator(model, prompts, opts: DataOptions, echo: Echo, with_agreement: bool = False):
    """One line of held-out figures on --eval-data, or None without it."""
    if opts.eval_data is None:
        return None
    eval_opts = dataclasses.replace(opts, data=opts.eval_data)
    records = checked(opts.eval_data, eval_opts, model, prompts, echo)

    @torch.no_grad()
    def run(m) -> str:
        r = eval_records(m, prompts, records, opts.max_new_tokens, with_agreement=with_agreement, progress=False)
        cats = " ".join(f"{c}={100 * v['accuracy']:.0f}" for c, v in r.per_category.items())
        agree = f", agreement with unsplit {100 * r.agreement:.1f}%" if r.agreement is not None else ""
        return f"held-out {100 * r.accuracy:.1f}% of {r.records} ({cats}){agree}"

    return run
