"""`edgeqtl bench client`: the device half (the client prefill graph) in ONNX Runtime fp32
and int8 against the same half in PyTorch eager: latency and peak memory.

Same CPU, same inputs (one question, batch 1, as on a device), same thread count. Each
runtime runs in a process of its own, so that its peak RSS counts only what that runtime
needs: the PyTorch process pays for importing torch, as a device running it would. The
worker is loaded from this file by path, not as edgeqtl.bench.client, so that the ONNX
Runtime processes do not import the other suites: only what the device agent imports.

Also checked: the codes each runtime computes, against PyTorch's (int8 rounds its weights,
so it may differ on a few codes; fp32 should agree on nearly all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TITLE = "Device half: ONNX Runtime fp32 and int8 against PyTorch eager (latency, peak RSS)"

RUNTIMES = ("torch", "fp32", "int8")
RUNTIME_NAMES = {"torch": "PyTorch eager", "fp32": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}
FULL_RUNS, QUICK_RUNS = 200, 20
WORKER_TIMEOUT_S = {True: 300, False: 1800}  # by ctx.quick: a hung worker is killed, not waited on forever

# Runs the worker of this very file in a fresh interpreter without importing edgeqtl.bench.
_WORKER_BOOT = ("import importlib.util, sys\n"
                "spec = importlib.util.spec_from_file_location('edgeqtl_bench_client_worker', sys.argv[1])\n"
                "module = importlib.util.module_from_spec(spec)\n"
                "spec.loader.exec_module(module)\n"
                "sys.exit(module.worker_main(sys.argv[2:]))\n")


# --------------------------------------------------------------------------- the suite
def run(ctx):
    import numpy as np

    from .fixtures import bundle_of, questions, the_model
    from .report import Section, busy_machine_note, markdown_table

    model_dir = the_model(ctx)
    bundle = bundle_of(ctx, model_dir)
    runs = QUICK_RUNS if ctx.quick else FULL_RUNS
    # Quick mode runs beside other work on a shared machine: one thread each, since an OpenMP
    # pool of two on two busy cores mostly waits at its barriers (PyTorch ~10x slower there).
    threads = 1 if ctx.quick else min(2, os.cpu_count() or 1)
    load_before = os.getloadavg()[0]
    question = questions(ctx, 1)[0]
    work = ctx.work("client")
    image_file = work / "question.npy"
    np.save(image_file, np.asarray(question.image, dtype=np.uint8)[None])  # a batch of one

    from edgeqtl.bundle import BundleManifest

    manifest = BundleManifest.load(bundle)
    variants = {g.variant for g in manifest.graphs if g.role == "prefill"}
    kinds = [k for k in RUNTIMES if k == "torch" or k in variants]
    missing = [k for k in ("fp32", "int8") if k not in kinds]

    results = {}
    for kind in kinds:
        ctx.echo(f"  {RUNTIME_NAMES[kind]}: {runs} runs, {threads} threads")
        job = {"kind": kind, "bundle": str(bundle), "model": str(model_dir), "threads": threads, "runs": runs,
               "images": str(image_file), "questions": [question.question],
               "codes_out": str(work / f"codes-{kind}.npy")}
        results[kind] = run_worker(job, work / f"job-{kind}.json", WORKER_TIMEOUT_S[ctx.quick])

    torch_codes = np.load(results["torch"]["codes_file"])
    base_ms, base_rss = results["torch"]["median_ms"], results["torch"]["peak_rss_mb"]
    runtimes = {}
    for kind, r in results.items():
        codes = np.load(r["codes_file"])
        same_shape = codes.shape == torch_codes.shape
        runtimes[kind] = {
            "name": RUNTIME_NAMES[kind], "median_ms": r["median_ms"], "p90_ms": r["p90_ms"], "mean_ms": r["mean_ms"],
            "runs": r["runs"], "peak_rss_mb": r["peak_rss_mb"], "rss_after_imports_mb": r["rss_after_imports_mb"],
            "torch_imported": r["torch_imported"],
            "latency_vs_torch": r["median_ms"] / base_ms, "rss_vs_torch": r["peak_rss_mb"] / base_rss,
            # the share of wire values equal to PyTorch's (codes for an fsq bundle)
            "same_as_torch": float(np.mean(codes == torch_codes)) if same_shape else 0.0,
        }
    figures = {"model": str(model_dir), "bundle": str(bundle), "cut": manifest.cut, "levels": manifest.levels,
               "quantizer": manifest.quantizer, "batch": 1, "threads": threads, "runs": runs,
               "wire_shape": list(torch_codes.shape), "question": question.question, "runtimes": runtimes,
               "missing_variants": missing, "load_average_before": load_before,
               "load_average_after": os.getloadavg()[0], "cpu_count": os.cpu_count()}

    plot = _plot(ctx, runtimes)
    rows = [[v["name"], v["median_ms"], v["p90_ms"], f"{v['latency_vs_torch']:.2f}x", v["peak_rss_mb"],
             f"{v['rss_vs_torch']:.2f}x", "yes" if v["torch_imported"] else "no", f"{100 * v['same_as_torch']:.1f}%"]
            for v in runtimes.values()]
    table = markdown_table(["runtime", "median ms", "p90 ms", "latency vs PyTorch", "peak RSS MB",
                            "RSS vs PyTorch", "torch imported", "wire values as PyTorch's"], rows)
    md = [f"The client half (prefill graph: image and prompt in, the {manifest.quantizer} wire "
          f"{'codes' if manifest.quantizer == 'fsq' else 'values'} out, shape {list(torch_codes.shape)}) of "
          f"`{model_dir}` at cut {manifest.cut}, batch 1, {threads} thread{'s' * (threads > 1)}, {runs} timed runs "
          f"after a warm-up, each runtime in a process of its own (peak RSS is that process's VmHWM). PyTorch "
          f"eager runs the model directory's client half; ONNX Runtime runs the bundle's graphs (`{bundle}`) with the session "
          f"options the device agent uses.", "", table, "", "![client half: latency and peak RSS](client.png)", "",
          "Latency ratios are medians over PyTorch's median (below 1: faster than PyTorch). \"Wire values as "
          "PyTorch's\" is the share of the sent values equal to those PyTorch computes for the same input.", "",
          f"Caveats: measured on this machine ({os.cpu_count()} CPU cores, load average {load_before:.1f} before "
          f"and {figures['load_average_after']:.1f} after), which may be running other work: compare the "
          "runtimes with each other, not with a device. Peak RSS includes each runtime's imports: after them, "
          "before loading the model, the processes held "
          + ", ".join(f"{v['rss_after_imports_mb']:.0f} MB ({v['name']})" for v in runtimes.values()) + "."]
    md += busy_machine_note(load_before, "the times are stretched by other work"
                            + (", and a pool of several threads waits at its barriers for the slowest, which can "
                               "stretch one runtime far more than another" if threads > 1 else ""))
    if missing:
        md += ["", f"The bundle has no {', '.join(missing)} prefill graph: not measured."]
    if ctx.quick:
        md += ["", f"Quick mode: {runs} runs each, so p90 is rough."]
    headline = [(f"{runtimes[k]['name']} latency vs PyTorch eager",
                 f"{runtimes[k]['latency_vs_torch']:.2f}x ({runtimes[k]['median_ms']:.2f} ms vs {base_ms:.2f} ms)")
                for k in ("fp32", "int8") if k in runtimes]
    headline.append(("device half peak RSS (" + " / ".join(runtimes[k]["name"] for k in runtimes) + ")",
                     " / ".join(f"{runtimes[k]['peak_rss_mb']:.0f} MB" for k in runtimes)))
    return Section("client", TITLE, "\n".join(md), figures, [plot], headline)


def run_worker(job: dict, job_file: Path, timeout_s: float) -> dict:
    """One runtime in its own process; its JSON result. A worker that hangs is killed."""
    job_file.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).resolve()), str(job_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {job['kind']} client worker ran past {timeout_s} s and was stopped") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if proc.returncode != 0:
        raise RuntimeError(f"the {job['kind']} client worker failed (exit {proc.returncode}):\n{err[-3000:]}")
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the {job['kind']} client worker printed no result:\n{err[-3000:]}")
    return json.loads(lines[-1])


def _plot(ctx, runtimes: dict) -> Path:
    from .report import new_figure, save_figure

    fig, _ = new_figure(9.0, 3.6)
    fig.clf()
    lat_ax, rss_ax = fig.subplots(1, 2)
    names = [v["name"].replace("ONNX Runtime", "ORT") for v in runtimes.values()]
    colors = ["#888888", "#1f77b4", "#2ca02c"][: len(names)]
    med = [v["median_ms"] for v in runtimes.values()]
    p90 = [v["p90_ms"] - v["median_ms"] for v in runtimes.values()]
    lat_ax.bar(names, med, yerr=[[0] * len(med), p90], color=colors, capsize=4)
    lat_ax.set_yscale("log")  # the runtimes can be an order of magnitude apart
    lat_ax.set_ylabel("ms per prefill (median, line to p90)")
    lat_ax.set_title("latency, batch 1")
    rss_ax.bar(names, [v["peak_rss_mb"] for v in runtimes.values()], color=colors)
    rss_ax.set_ylabel("peak RSS, MB")
    rss_ax.set_title("peak memory of the process")
    return save_figure(fig, ctx.path("client.png"))


# --------------------------------------------------------------------------- the worker
def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(argv) -> int:
    """In a fresh process: time one runtime on the job's questions (one batch), print a JSON line."""
    job = json.loads(Path(argv[0]).read_text())
    print(json.dumps(measure_runtime(job)))
    return 0


def measure_runtime(job: dict) -> dict:
    import numpy as np

    from edgeqtl.bundle import BundleManifest
    from edgeqtl.imageproc import preprocess
    from edgeqtl.memory import peak_rss_mb
    from edgeqtl.prompt import PromptEncoder

    kind, bundle, threads, runs = job["kind"], Path(job["bundle"]), int(job["threads"]), int(job["runs"])
    manifest = BundleManifest.load(bundle)
    ids, mask = PromptEncoder.from_bundle(bundle, manifest.text).encode(job["questions"])
    images = np.load(job["images"])  # (B, H, W, 3) uint8, one per question
    if len(images) != len(job["questions"]):
        raise ValueError(f"{len(images)} images for {len(job['questions'])} questions")
    pix = preprocess(images, manifest.image)
    if kind == "torch":
        import torch

        from edgeqtl.models.load import load_split_model
        from edgeqtl.models.split import SPLIT_CONFIG_FILE, SplitConfig

        torch.set_num_threads(threads)
        imports_rss = _rss_now_mb()
        model_dir = Path(job["model"])
        # a plain checkpoint (no split config of its own) is cut as its bundle was
        split = None if (model_dir / SPLIT_CONFIG_FILE).is_file() else SplitConfig(cut=manifest.cut,
                                                                                   levels=manifest.levels)
        client = load_split_model(model_dir, split).client.eval()
        t_ids, t_mask, t_pix = map(torch.from_numpy, (ids, mask, pix))

        def step():  # what the device computes: with prompt ids (cut 0), the image positions' codes alone
            with torch.inference_mode():
                if manifest.prompt_ids:
                    return client.image_wire(t_pix).wire.numpy()
                return client(t_ids, t_mask, t_pix).wire.numpy()
    else:
        from edgeqtl.device_agent.session import open_session  # as the device agent opens it: no torch here

        imports_rss = _rss_now_mb()
        session = open_session(bundle / manifest.graph("prefill", kind).file, manifest.target, threads)
        feeds = {"pixel_values": pix} if manifest.prompt_ids else \
            {"pixel_values": pix, "input_ids": ids, "attention_mask": mask}

        def step():
            return session.run(None, feeds)[0]
    wire = step()
    for _ in range(max(5, runs // 10)):  # warm-up: allocator, caches, lazy initialisation
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    np.save(job["codes_out"], np.asarray(wire))
    ms = 1e3 * np.asarray(times)
    return {"kind": kind, "runs": runs, "batch": len(images), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": imports_rss,
            "torch_imported": "torch" in sys.modules, "codes_file": job["codes_out"]}
