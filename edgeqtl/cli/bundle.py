"""`edgeqtl bundle inspect`: what a bundle is, and whether every file is what the
manifest says. Torch-free, so it runs on the device too."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import UserError, user_errors


@click.group()
def bundle():
    """Look at an exported bundle."""


@bundle.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the text report.")
@user_errors
def inspect(directory, as_json):
    """What BUNDLE holds (model family, cut, levels, image tokens, graph variants with
    sizes and sha256, fingerprint, chat template, generation settings), and a check of
    every file against the manifest's size and sha256. Exits 1 when a file is missing,
    truncated or changed.

    \b
    Example:
      edgeqtl bundle inspect bundles/pi
    """
    from edgeqtl.bundle import BundleManifest

    m = BundleManifest.load(directory)
    problems = m.file_problems(directory)
    sizes = {f.name: f for f in m.files}
    server_meta = directory / m.server_dir / "edgeqtl_server.json"
    generation = json.loads(server_meta.read_text()).get("generation") if server_meta.is_file() else None
    variants = []
    for g in m.graphs:
        files = [g.file, *g.data_files]
        variants.append({"role": g.role, "variant": g.variant, "opset": g.opset,
                         "files": [{"name": n, "size": sizes[n].size if n in sizes else None,
                                    "sha256": sizes[n].sha256 if n in sizes else None} for n in files]})
    report = {"bundle": str(directory), "family": m.family, "fingerprint": m.fingerprint, "cut": m.cut,
              "quantizer": m.quantizer, "levels": m.levels if m.quantizer == "fsq" else None, "code_dim": m.code_dim,
              "hidden_size": m.hidden_size, "layers": m.num_layers, "target": m.target,
              "image_tokens": m.text.image_token_count, "image_size": m.image.size,
              "image_reduction": m.image_reduction,
              "max_context": m.max_context, "entropy_coding": m.entropy is not None, "variants": variants,
              "chat": m.text.chat.to_dict(), "generation": generation,
              "files": {name: problem or "ok" for name, problem in problems.items()}}
    bad = {n: p for n, p in problems.items() if p is not None}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)
    if bad:
        raise UserError(f"{len(bad)} file(s) of {directory} do not match the manifest: "
                        + "; ".join(f"{n}: {p}" for n, p in bad.items()) + ". Copy the bundle again")


def _print(r: dict) -> None:
    mib = lambda n: "?" if n is None else f"{n / 2 ** 20:,.1f} MiB"  # noqa: E731
    levels = f"{r['levels']} levels" if r["levels"] else "16-bit values"
    click.echo(f"bundle       {r['bundle']}")
    click.echo(f"family       {r['family'] or 'unknown (exported before bundles recorded it)'}")
    click.echo(f"fingerprint  {r['fingerprint']}")
    click.echo(f"split        cut {r['cut']} of {r['layers']} layers, {r['quantizer']} {levels}, "
               f"{r['code_dim']} codes per token (hidden {r['hidden_size']}), target {r['target']}, "
               f"entropy coding {'on' if r['entropy_coding'] else 'off'}")
    red = r.get("image_reduction")
    reduced = f" (kept by {red['reducer']}, {red.get('positions', 'consecutive')} positions)" if red else ""
    click.echo(f"image        {r['image_size']} px -> {r['image_tokens']} image tokens{reduced}; "
               f"context {r['max_context'] or '?'} tokens")
    for v in r["variants"]:
        for i, f in enumerate(v["files"]):
            head = f"{v['role']}/{v['variant']}" if i == 0 else ""
            click.echo(f"  {head:<14} {f['name']:<40} {mib(f['size']):>14}  {(f['sha256'] or '?')[:16]}")
    chat = r["chat"]
    click.echo(f"chat         prefix {chat['prefix']!r} user {chat['user']!r} assistant {chat['assistant']!r} "
               f"answer {chat['answer']!r}")
    if r["generation"]:
        click.echo(f"generation   {json.dumps(r['generation'])}")
    bad = {n: p for n, p in r["files"].items() if p != "ok"}
    click.echo(f"files        {len(r['files']) - len(bad)} of {len(r['files'])} match the manifest"
               + "".join(f"\n  BAD  {n}: {p}" for n, p in bad.items()))
