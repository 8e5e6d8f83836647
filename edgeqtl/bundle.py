"""The device bundle's manifest (manifest.json): everything a device needs to run the
client half with ONNX Runtime alone, and to prove to a server that both halves came
from the same export. Torch-free: the device agent reads it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import EdgeqtlError
from .imageproc import ImageSpec
from .prompt import ChatFormat

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: the chat template as a ChatFormat (edgeqtl.prompt)
TARGETS = ("cpu", "arm64", "jetson")


class BundleError(EdgeqtlError, ValueError):
    """A bundle that is missing, incomplete, or from an incompatible export."""


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: uint8, int64, float32, float16
    shape: list  # ints, or names of dynamic dimensions


@dataclasses.dataclass
class GraphSpec:
    role: str  # "prefill" (image + prompt -> codes [+ cache]) or "decode" (one token + cache)
    variant: str  # "fp32", "int8" (dynamic MatMul quantization) or "fp16"
    file: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: str = ""
    data_files: list[str] = dataclasses.field(default_factory=list)  # external weights beside the graph


@dataclasses.dataclass
class FileSpec:
    """One file of the bundle, relative to its directory."""

    name: str
    size: int
    sha256: str


@dataclasses.dataclass
class TextSpec:
    tokenizer_file: str
    chat: ChatFormat  # the checkpoint's chat template, reduced (edgeqtl.prompt)
    image_token: str
    image_token_id: int
    image_token_count: int
    eos_token_id: int
    pad_token_id: int


@dataclasses.dataclass
class BundleManifest:
    fingerprint: str  # hex SHA-256 over both halves' weights and the split config
    cut: int
    quantizer: str  # "fsq" or "fp16"
    levels: int
    code_dim: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    image: ImageSpec
    text: TextSpec
    graphs: list[GraphSpec]
    target: str
    format_version: int = FORMAT_VERSION
    server_dir: str = "server"
    # Per-dimension code counts (code_dim x levels) for entropy coding; None: plain packing.
    entropy: list | None = None
    # Every file of the bundle but this manifest, the server half's included, with its size and sha256.
    files: list[FileSpec] = dataclasses.field(default_factory=list)
    max_context: int | None = None  # the model's context length: longer prompts are refused before sending
    family: str | None = None  # the checkpoint's model_type and its LLM's, e.g. "llava/qwen2"
    # cut 0: the prefill graph takes pixels alone and returns the image positions' codes;
    # the prompt's text goes up as token ids, embedded by the server (docs/PROTOCOL.md)
    prompt_ids: bool = False
    # the device's visual token reducer ({"reducer", "tokens", "seed", "positions", "span"}; models/reduce.py),
    # None: every image token goes up
    image_reduction: dict | None = None
    # SmolVLM's image splitting (edgeqtl.tiling.TileSpec), None: one view per image
    image_tiling: dict | None = None

    @property
    def fingerprint_bytes(self) -> bytes:
        """The 16 bytes that travel in every frame header."""
        return bytes.fromhex(self.fingerprint)[:16]

    @property
    def entropy_model(self):
        """The bundle's EntropyModel, or None (fp16 wire, or exported without one)."""
        from .codec import CodecError, EntropyModel

        if self.entropy is None:
            return None
        try:
            model = EntropyModel.from_list(self.entropy)
        except CodecError as e:
            raise BundleError(f"manifest's entropy model is malformed ({e}); re-export the bundle") from None
        if (model.code_dim, model.levels) != (self.code_dim, self.levels):
            raise BundleError("manifest's entropy model does not match its code_dim and levels; re-export the bundle")
        return model

    def graph(self, role: str, variant: str | None = None) -> GraphSpec:
        options = [g for g in self.graphs if g.role == role and (variant is None or g.variant == variant)]
        if not options:
            have = ", ".join(f"{g.role}/{g.variant}" for g in self.graphs)
            raise BundleError(f"bundle has no {role} graph{'' if variant is None else f' ({variant})'}; it has {have}")
        return options[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def device_files(self) -> list[str]:
        """What a device needs: every graph with its external data, and the tokenizer."""
        names = [self.text.tokenizer_file]
        for g in self.graphs:
            names += [g.file, *g.data_files]
        return names

    def check_files(self, directory: str | Path, names: list[str] | None = None, hashes: bool = False) -> None:
        """Each listed file (default: the device's) is there at its size, and with
        hashes=True has its sha256: a truncated or partial copy is refused by name."""
        directory = Path(directory)
        specs = {f.name: f for f in self.files}
        for name in names if names is not None else self.device_files():
            path = directory / name
            spec = specs.get(name)
            if not path.is_file():
                raise BundleError(f"bundle {directory} is missing {name}; copy the whole bundle directory")
            if spec is None:
                continue  # not listed (a bundle from before file lists): nothing to compare
            if path.stat().st_size != spec.size:
                raise BundleError(f"bundle file {name} is {path.stat().st_size} bytes, the manifest says {spec.size}: "
                                  "a truncated or partial copy; copy the bundle again (rsync -a --checksum)")
            if hashes and file_sha256(path) != spec.sha256:
                raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: corrupt; copy the "
                                  "bundle again")

    def file_problems(self, directory: str | Path) -> dict[str, str | None]:
        """Every listed file, and what is wrong with it (None: there, at its size and
        sha256). Files in the directory that the manifest does not list are named too."""
        directory = Path(directory)
        out: dict[str, str | None] = {}
        for spec in self.files:
            path = directory / spec.name
            if not path.is_file():
                out[spec.name] = "missing"
            elif path.stat().st_size != spec.size:
                out[spec.name] = f"{path.stat().st_size} bytes, the manifest says {spec.size}: truncated or partial"
            elif file_sha256(path) != spec.sha256:
                out[spec.name] = "sha256 differs from the manifest's: corrupt or changed"
            else:
                out[spec.name] = None
        listed = {f.name for f in self.files} | {MANIFEST_FILE}
        for path in sorted(directory.rglob("*")):
            name = path.relative_to(directory).as_posix()
            if path.is_file() and name not in listed:
                out[name] = "not in the manifest"
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "BundleManifest":
        try:
            version = d.get("format_version")
            if version != FORMAT_VERSION:
                raise BundleError(f"bundle format version {version}; this edgeqtl reads version {FORMAT_VERSION}. "
                                  "Re-export it with this edgeqtl version")
            d = dict(d)
            d["image"] = ImageSpec.from_dict(d["image"])
            d["text"] = TextSpec(**{**d["text"], "chat": ChatFormat.from_dict(d["text"]["chat"])})
            d["graphs"] = [GraphSpec(**{**g, "inputs": [TensorSpec(**t) for t in g["inputs"]],
                                        "outputs": [TensorSpec(**t) for t in g["outputs"]]}) for g in d["graphs"]]
            d["files"] = [FileSpec(**f) for f in d.get("files", [])]
            m = cls(**d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest is malformed ({type(e).__name__}: {e}); re-export the bundle") from None
        if m.target not in TARGETS:
            raise BundleError(f"unknown target {m.target!r}; expected one of {TARGETS}")
        return m

    @classmethod
    def load(cls, directory: str | Path) -> "BundleManifest":
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise BundleError(f"bundle directory not found: {directory}; create one with `edgeqtl export`")
        if not path.is_file():
            raise BundleError(f"{directory} has no {MANIFEST_FILE}: not an edgeqtl bundle (create one with `edgeqtl export`)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Streamed: a 2 GB weight file is never read into memory at once."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
