"""Held-out evaluation of a split model.

    evaluate          the built-in worlds: the first answer word, one forward pass per batch
    evaluate_records  a user's LLaVA records: greedy generation, normalised exact match
                      (lower case, punctuation and articles stripped), per category; for an
                      adapted checkpoint also the agreement of its answers with the unsplit
                      model's (the same weights without the quantizer)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from edgeqtl.codec import packed_nbytes

from edgeqtl.data import normalize_answer

from .batches import Batch, Collator, Example
from .generate import generate
from .split import SplitModel, sent_positions


@dataclasses.dataclass
class EvalReport:
    accuracy: dict[str, float]
    n: int
    wire_bytes_per_sample: float
    fp16_bytes_per_sample: float

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(list(self.accuracy.values())))

    def table(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append("family      accuracy")
        for fam, acc in self.accuracy.items():
            lines.append(f"{fam:<10}  {100 * acc:6.2f}%")
        lines.append(f"{'mean':<10}  {100 * self.mean_accuracy:6.2f}%")
        saved = 1 - self.wire_bytes_per_sample / self.fp16_bytes_per_sample
        lines.append(f"uplink per sample: {self.wire_bytes_per_sample * 8:,.0f} bits "
                     f"({self.wire_bytes_per_sample:,.0f} B) vs 16-bit {self.fp16_bytes_per_sample * 8:,.0f} bits "
                     f"({self.fp16_bytes_per_sample:,.0f} B): {100 * saved:.1f}% saved (payload only: the codes, "
                     f"and at cut 0 the prompt's ids as a bundle sends them)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The schema `edgeqtl eval --json` writes for every data source (RecordEvalReport too)."""
        per = self.n // max(1, len(self.accuracy))
        return {"accuracy": self.mean_accuracy, "records": self.n,
                "per_category": {f: {"accuracy": a, "records": per} for f, a in self.accuracy.items()},
                "wire_bytes_per_sample": self.wire_bytes_per_sample, "fp16_bytes_per_sample": self.fp16_bytes_per_sample}


def wire_nbytes(model: SplitModel, n_tokens: int, n_image: int | None = None) -> int:
    """Bytes of payload the client sends for one sample of n_tokens positions, n_image of
    them image tokens. At cut 0 a bundle sends the prompt's text as INT32 ids (its
    default; `export --prompt-codes` sends every position as codes), so only the image
    positions count as codes there; n_image None counts every position as codes."""
    s = model.split
    ids = 0
    if s.cut == 0 and n_image is not None:
        ids, n_tokens = 4 * (n_tokens - n_image), n_image
    if s.quantizer == "fsq":
        return packed_nbytes(n_tokens * s.code_dim, s.levels) + ids
    return n_tokens * model.hidden_size * (2 if s.quantizer == "fp16" else 4) + ids


@torch.no_grad()
def predict(model: SplitModel, batch: Batch) -> torch.Tensor:
    """Greedy next token after each prompt (the first answer word)."""
    return model.next_logits(batch.input_ids, batch.attention_mask, batch.pixel_values).argmax(-1)


@torch.no_grad()
def evaluate(model: SplitModel, collate: Collator, samples, batch_size: int = 250) -> EvalReport:
    was_training = model.client.training
    model.eval()
    correct: dict[str, list[bool]] = {f: [] for f in dict.fromkeys(s.family for s in samples)}
    wire = fp16 = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = collate(chunk, with_answer=False)
        pred = predict(model, b)
        codes = sent_positions(model, b).sum(-1).tolist()  # at cut 0 the image positions alone
        for s, p, m, k in zip(chunk, pred.tolist(), b.attention_mask.sum(-1).tolist(), codes):
            correct[s.family].append(collate.tok.id_to_token(p) == s.answer)
            wire += wire_nbytes(model, m, k)
            fp16 += m * model.hidden_size * 2
    model.train(was_training)
    return EvalReport({f: float(np.mean(v)) for f, v in correct.items()}, len(samples),
                      wire / len(samples), fp16 / len(samples))


# --------------------------------------------------------------------------- a user's records


@dataclasses.dataclass
class RecordEvalReport:
    accuracy: float  # fraction of scored records whose normalised answer matches
    records: int  # records scored (with a reference answer)
    per_category: dict[str, dict]  # category -> {"accuracy", "records"}
    unscored: int = 0  # records without an answer to compare with
    agreement: float | None = None  # answers equal to the unsplit model's, over all records
    examples: list[dict] = dataclasses.field(default_factory=list)  # a few (prompt, answer, reference)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'category':<20}{'records':>8}  accuracy")
        for cat, r in self.per_category.items():
            lines.append(f"{cat:<20}{r['records']:>8}  {100 * r['accuracy']:6.2f}%")
        lines.append(f"{'all':<20}{self.records:>8}  {100 * self.accuracy:6.2f}%")
        if self.unscored:
            lines.append(f"{self.unscored} record(s) without an answer were not scored")
        if self.agreement is not None:
            lines.append(f"agreement with the unsplit model's answers: {100 * self.agreement:.2f}%")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_records(model: SplitModel, collate: Collator, batches, max_new_tokens: int, eos_ids: set[int],
                     with_agreement: bool = False, progress=None) -> RecordEvalReport:
    """`batches`: lists of Examples. Each record's last assistant turn is the reference;
    the model answers the conversation up to it, greedily."""
    was_training = model.client.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    agree: list[bool] = []
    shown: list[dict] = []
    unscored = 0
    for examples in batches:
        batch = collate(examples, with_answer=False)
        answers = [collate.prompts.tok.decode(ids) for ids in generate(model, batch, max_new_tokens, eos_ids)]
        if with_agreement:
            plain = [collate.prompts.tok.decode(ids)
                     for ids in generate(model, batch, max_new_tokens, eos_ids, quantized=False)]
            agree += [normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, plain)]
        for ex, answer in zip(examples, answers):
            if ex.answer is None:
                unscored += 1
                continue
            ok = normalize_answer(answer) == normalize_answer(ex.answer)
            hits.setdefault(ex.category or "all", []).append(ok)
            if len(shown) < 8:
                shown.append({"prompt": ex.prompt_turns()[-1][1], "answer": answer, "reference": ex.answer,
                              "right": ok})
        if progress is not None:
            progress(len(examples))
    model.train(was_training)
    scored = [h for v in hits.values() for h in v]
    return RecordEvalReport(float(np.mean(scored)) if scored else 0.0, len(scored),
                            {c: {"accuracy": float(np.mean(v)), "records": len(v)} for c, v in hits.items()},
                            unscored, float(np.mean(agree)) if agree else None, shown)
