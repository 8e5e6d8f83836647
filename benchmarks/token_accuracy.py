"""Visual token reduction on a trained model (models/reduce.py): held-out accuracy per
family and measured uplink bytes per question, for each reducer and K, training-free and
after a short quantizer adaptation with the reduced sequence.

    edgeqtl train --preset small --bits 2 --out runs/small23/all        # once, every image token
    python benchmarks/token_accuracy.py --model runs/small23/all         # the table
    python benchmarks/token_accuracy.py --model runs/tiny16 --train-patch 16   # tiny, 16 image tokens
    python benchmarks/token_accuracy.py --model runs/tiny64et --train-patch 8 --train-exact-text   # 64 tokens

Per (reducer, K):
  1. training-free: the trained model, its reducer set to K, evaluated as it is;
  2. adapted: the quantizer alone (the device's encoder, the server's decoder; nothing
     else moves) trains --adapt-steps steps on the world's training stream with the
     reduced sequence, warm from the trained quantizer, then is evaluated again. A model
     trained from scratch through its quantizer has no unquantized teacher, so this is
     issue 14's adaptation with the task's own loss in place of self-distillation.

Bytes are frames built as the device builds them and encoded (edgeqtl.wire): at cut 0,
TENSORS [the image positions' codes, the prompt's INT32 ids, JSON options], headers
included (a device id of 8 characters, MQTT 5), averaged over --byte-questions held-out
questions, one per frame. "packed" is
log2(L) bits a code; "rANS" is entropy-coded under a model fitted, as export fits it, on
every image token of 256 training images (one server half serves every K). 16-bit is the
same prompt's hidden states with every image token, one frame. "prompt as codes" is the
bundle `edgeqtl export --prompt-codes` makes: every position as codes.

Every run uses the same held-out questions, so differences between rows are paired.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch



def train_tiny_variant(out: Path, patch_size: int, steps: int, cut: int = 0, exact_text: bool = False) -> None:
    """The tiny preset with smaller patches (16 px: 16 image tokens, 4 per cell of the
    shapes world; 8 px: 64, 16 per cell), trained from scratch with the tiny recipe at 2 bits, at `cut` (0; 2 for
    FastV, which prunes with the device's own layers): a model with enough image tokens
    to reduce that trains in well under an hour on 2 cores. exact_text: trained with the
    prompt as ids (the text reaches the trunk as its own embeddings; cut 0)."""
    import dataclasses

    from edgeqtl import shapes
    from edgeqtl.models.jobs import train_world
    from edgeqtl.models.presets import PRESETS, build_preset
    from edgeqtl.models.split import SplitConfig, SplitModel

    preset = dataclasses.replace(PRESETS["tiny"], patch_size=patch_size)
    model = SplitModel(build_preset(preset, 0), SplitConfig(cut=cut, levels=4, exact_text=exact_text))
    print(f"training the tiny preset with {patch_size} px patches ({preset.num_image_tokens} image tokens), "
          f"{steps} steps at cut {cut} -> {out}", flush=True)
    t0 = time.perf_counter()
    train_world(model, preset.train_config(steps=steps), out, print, progress=False, world=shapes)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)


def load(model_dir: Path):
    from edgeqtl.models.load import load_prompts, load_split_model, world_of

    model = load_split_model(model_dir).eval()
    return model, load_prompts(model_dir, model), world_of(model_dir)


def with_tokens(model, prompts, reducer: str | None, k: int | None, positions: str = "original"):
    """The model (a copy) keeping K of each image's tokens, and its prompt encoder."""
    from edgeqtl.models.reduce import ImageReduction

    model = copy.deepcopy(model)
    model.set_image_reduction(ImageReduction(reducer, k, positions=positions) if reducer else None)
    prompts = copy.copy(prompts)
    prompts.image_token_count = model.num_image_tokens
    return model, prompts


def accuracy(model, prompts, world, per_family: int) -> dict:
    from edgeqtl.models.jobs import eval_world

    report = eval_world(model, prompts, per_family, world)
    return {"accuracy": round(100 * report.mean_accuracy, 2),
            "per_family": {f: round(100 * a, 2) for f, a in report.accuracy.items()}, "questions": report.n}


def adapt_quantizer(model, prompts, world, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """The quantizer alone trains `steps` steps through the wire path; returns seconds."""
    from edgeqtl.models.batches import Collator, image_spec_of
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.steps import adamw
    from edgeqtl.models.training import TrainConfig, wire_step

    cfg = TrainConfig(batch_size=batch_size, seed=seed, curriculum_steps=0)
    source = WorldSource(Collator(prompts, image_spec_of(model)), cfg, world)
    params = list(model.client.encoder.parameters()) + list(model.server.decoder_q.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, lr, 0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10)
        opt.zero_grad(set_to_none=True)
        wire_step(model, source.batch(step, source.categories), 0.1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def fit_entropy(model, prompts, world, n: int = 256, image_only: bool | None = None):
    """image_only (default: at cut 0): the image positions alone, what goes as codes with
    prompt ids; at cut > 0 every position goes as codes."""
    image_only = model.split.cut == 0 if image_only is None else image_only
    from edgeqtl.export.calibration import world_samples
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.rate import fit_image_entropy

    return fit_image_entropy(model, world_samples(n, heldout=False, world=world), prompts, image_spec_of(model), 64,
                             image_only)


def frame_bytes(model, prompts, world, questions: int, entropy, prompt_ids: bool | None = None) -> dict:
    from edgeqtl.export.calibration import world_samples
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.rate import question_bytes

    prompt_ids = model.split.cut == 0 if prompt_ids is None else prompt_ids
    row = question_bytes(model, world_samples(questions, heldout=True, world=world), prompts, image_spec_of(model),
                         prompt_ids, entropy)
    return {"packed": row.packed, "rans": row.rans, "fp16_all_tokens": row.fp16, "positions": row.positions,
            "code_elements": row.positions * model.split.code_dim}


def payload_bits(model, prompts, world, questions: int, entropy) -> float:
    """rANS bits per code element at the image positions (the payload alone)."""
    from edgeqtl.codec import encode_codes_entropy
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.export.calibration import batches, world_samples
    from edgeqtl.models.split import kept_rows

    bits = elems = 0
    for inputs in batches(world_samples(questions, heldout=True, world=world), prompts, image_spec_of(model), 16):
        ids = torch.from_numpy(inputs.input_ids)
        with torch.inference_mode():
            out = model.client(ids, torch.from_numpy(inputs.attention_mask), torch.from_numpy(inputs.pixel_values))
        for row, sent in zip(out.wire.numpy(), kept_rows(ids, out.rows).numpy()):  # FastV sends K image rows
            c = np.ascontiguousarray(row[sent == prompts.image_token_id][None])
            bits += 8 * len(encode_codes_entropy(c, model.split.levels, entropy))
            elems += c.size
    return bits / elems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="A split model trained with every image token.")
    ap.add_argument("--reducers", default="divprune,attention,pool,random",
                    help="Add fastv for a model at cut 1 or more (--train-cut 2).")
    ap.add_argument("--fractions", default="0.5,0.25,0.125,0.0625")
    ap.add_argument("--per-family", type=int, default=100, help="Held-out questions per family.")
    ap.add_argument("--adapt-steps", type=int, default=100, help="0: training-free only.")
    ap.add_argument("--adapt-lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--byte-questions", type=int, default=70)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="Default: MODEL/token_accuracy.json")
    ap.add_argument("--train-patch", type=int, default=None,
                    help="First train the tiny preset with this patch size (16: 16 image tokens) into --model, "
                         "unless it is there.")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--train-cut", type=int, default=0, help="The cut of the model --train-patch trains (2: FastV).")
    ap.add_argument("--train-exact-text", action="store_true",
                    help="--train-patch trains with the prompt as ids (`edgeqtl train --exact-text`), to compare "
                         "against a model whose prompt went through the quantizer.")
    ap.add_argument("--consecutive-positions", action="store_true",
                    help="Also evaluate each reducer training-free with the kept tokens at consecutive positions "
                         "(the other convention, models/reduce.py; bundles from before the field use it).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_patch and not (args.model / "config.json").is_file():
        train_tiny_variant(args.model, args.train_patch, args.train_steps, args.train_cut, args.train_exact_text)
    out_json = args.json or args.model / "token_accuracy.json"

    base_model, base_prompts, world = load(args.model)
    full = base_model.num_image_tokens
    entropy = fit_entropy(base_model, base_prompts, world)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_json.write_text(json.dumps(rows, indent=2))

    base = {"reducer": "none", "tokens": full, "stage": "trained", **accuracy(base_model, base_prompts, world,
                                                                              args.per_family),
            "bytes": frame_bytes(base_model, base_prompts, world, args.byte_questions, entropy),
            "bits_per_code": round(payload_bits(base_model, base_prompts, world, 128, entropy), 4)}
    if base_model.split.cut == 0 and not base_model.split.exact_text:  # at cut > 0 the prompt goes as codes anyway
        codes_all = fit_entropy(base_model, base_prompts, world, image_only=False)
        base["bytes_prompt_as_codes"] = frame_bytes(base_model, base_prompts, world, args.byte_questions, codes_all,
                                                    prompt_ids=False)
    emit(base)
    for reducer in args.reducers.split(","):
        for frac in (float(f) for f in args.fractions.split(",")):
            k = max(1, round(frac * full))
            try:
                model, prompts = with_tokens(base_model, base_prompts, reducer, k)
            except Exception as e:  # pool needs a square K: say so in the table
                emit({"reducer": reducer, "tokens": k, "fraction": frac, "stage": "refused", "error": str(e)})
                continue
            row = {"reducer": reducer, "tokens": k, "fraction": frac, "stage": "training-free",
                   **accuracy(model, prompts, world, args.per_family),
                   "bytes": frame_bytes(model, prompts, world, args.byte_questions, entropy)}
            emit(row)
            if args.consecutive_positions:
                plain, plain_prompts = with_tokens(base_model, base_prompts, reducer, k, "consecutive")
                emit({"reducer": reducer, "tokens": k, "fraction": frac, "stage": "training-free, consecutive",
                      **accuracy(plain, plain_prompts, world, args.per_family),
                      "bytes": frame_bytes(plain, plain_prompts, world, args.byte_questions, entropy)})
            if args.adapt_steps:
                seconds = adapt_quantizer(model, prompts, world, args.adapt_steps, args.adapt_lr, args.batch_size,
                                          seed=11)
                own = fit_entropy(model, prompts, world)  # the adapted quantizer's server half fits its own
                emit({"reducer": reducer, "tokens": k, "fraction": frac, "stage": "adapted",
                      "adapt_steps": args.adapt_steps, "adapt_s": round(seconds, 1),
                      **accuracy(model, prompts, world, args.per_family),
                      "bytes": frame_bytes(model, prompts, world, args.byte_questions, own)})
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    fams = list(base["per_family"])
    fp16 = base["bytes"]["fp16_all_tokens"]
    print(f"\n{base['questions']} held-out questions; bytes per question, headers included; 16-bit hidden states "
          f"with every image token: {fp16:,.0f} B")
    print("| reducer | K | stage | accuracy | " + " | ".join(fams) + " | packed B | rANS B | rANS vs 16-bit |")
    print("|---" * (7 + len(fams)) + "|")
    for r in rows:
        if r["stage"] == "refused":
            print(f"| {r['reducer']} | {r['tokens']} | refused: {r['error']} |")
            continue
        b = r["bytes"]
        print(f"| {r['reducer']} | {r['tokens']} | {r['stage']} | {r['accuracy']:.2f} | "
              + " | ".join(f"{r['per_family'].get(f, float('nan')):.1f}" for f in fams)
              + f" | {b['packed']:,.0f} | {b['rans']:,.0f} | {100 * (1 - b['rans'] / fp16):.2f}% less |")
    pc = base.get("bytes_prompt_as_codes")
    if pc:
        print(f"\nprompt as codes (--prompt-codes), every token: packed {pc['packed']:,.0f} B, rANS {pc['rans']:,.0f} B "
              f"({pc['positions']:.0f} positions) against prompt ids: packed {base['bytes']['packed']:,.0f} B, "
              f"rANS {base['bytes']['rans']:,.0f} B")
    print(f"rANS payload of the trained model: {base['bits_per_code']:.3f} bits a code element")


if __name__ == "__main__":
    main()
