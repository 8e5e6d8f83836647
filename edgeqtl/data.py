"""Your own data: LLaVA-style conversation records.

Training, evaluation, calibration and the benchmarks all read one format, the one
LLaVA uses. A data file is either a JSON list of records or JSON lines (one record per
line). Which one is decided by the content, not the file name: a file whose first
non-space character is `[` is a JSON list. A record looks like this:

    {"id": "coco-17",
     "image": "images/coco-17.jpg",
     "conversations": [
         {"from": "human", "value": "<image>\\nWhat is on the table?"},
         {"from": "gpt", "value": "A bowl of oranges."}],
     "category": "objects"}

- `image`: one image file per record (a list holding one path is accepted too).
  Relative paths resolve against the data file's folder, or against `--image-root`
  when given; absolute paths are used as they are. Any size, aspect ratio and colour
  mode is fine (transparency is composited on white, EXIF rotation is applied).
- `conversations`: turns that alternate user, assistant, user, ... starting with the
  user. `from` is `human` or `user` for the user and `gpt` or `assistant` for the
  model; the OpenAI spelling `{"role": "user", "content": "..."}` (and a top-level
  `messages` list) works too. Several turns are fine. The last turn may be a user
  turn, and a record may have no answer at all: a teacher model supplies it later.
- The first user turn holds exactly one `<image>` marker, where the image goes.
  Multi-image and text-only records are not supported.
- `id` (optional): any string or number, kept as a string; without one a record is
  called `<file name>:<line>` (JSON lines) or `<file name>[<index>]` (JSON list).
- `category` (optional): a label used for per-category scores and non-IID splits.

Before training, every record is checked: structure, image present and readable,
and (when the model's context length is known) prompt length. Each bad record is
reported on one line, `record <id> (<file>:<line>): <fault>`; the run stops unless
`--skip-bad` is given, which skips bad records and says how many.

numpy + Pillow + the standard library: the device agent reads data files too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import string
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import EdgeqtlError
from .imageproc import ImageError, load_image

IMAGE_MARKER = "<image>"
USER, ASSISTANT = "user", "assistant"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
SHOWN_FAULTS = 5  # how many fault lines a DataError quotes before "and N more"
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's four whitespace characters
CHECK_DECODE_SIZE = 32  # check_records decodes JPEGs at 1/8 scale: cheap, still catches truncation
CHECK_CHUNK = 1024  # images checked per round of worker threads


class DataError(EdgeqtlError, ValueError):
    """A data file or record that cannot be used; one line naming where, what and the fix."""


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclasses.dataclass
class Record:
    id: str
    image: Path  # resolved against the data file's folder or image_root
    turns: list[Turn]
    category: str | None
    source: str  # "<file name>:<line>", where to look

    @property
    def prompt(self) -> str:
        """The first user turn without its <image> marker."""
        return self.turns[0].text.replace(IMAGE_MARKER, "").strip()

    @property
    def answers(self) -> list[str]:
        return [t.text for t in self.turns if t.role == ASSISTANT]

    @property
    def has_answer(self) -> bool:
        return any(t.role == ASSISTANT for t in self.turns)

    def to_dict(self) -> dict:
        """The record in LLaVA spelling, for write_records."""
        d = {"id": self.id, "image": str(self.image),
             "conversations": [{"from": "human" if t.role == USER else "gpt", "value": t.text} for t in self.turns]}
        if self.category is not None:
            d["category"] = self.category
        return d


@dataclasses.dataclass
class BadRecord:
    """A record whose structure is wrong; load_records keeps it so that check_records
    can report it together with the other faults (and --skip-bad can skip it)."""

    id: str
    source: str
    fault: str


def fault_line(record: Record | BadRecord, fault: str) -> str:
    return f"record {record.id} ({record.source}): {fault}"


# --------------------------------------------------------------------------- reading files


def load_records(path: str | Path, image_root: str | Path | None = None) -> list[Record | BadRecord]:
    """Parse a data file. JSON that does not parse raises DataError (always fatal);
    a record with a wrong structure comes back as a BadRecord for check_records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass a JSON or JSON-lines file of LLaVA records")
    text = _read_text(path)
    # absolute, so that the records still find their images after a change of directory
    root = Path(image_root).absolute() if image_root is not None else path.absolute().parent
    start = _WHITESPACE.match(text).end()
    name = path.name
    if text.startswith("[", start):
        values = _json_list(text, start, name)
        records = [_parse_record(v, name, line, f"{name}[{i}]", root) for i, (v, line) in enumerate(values)]
    else:
        records = [_parse_record(v, name, line, f"{name}:{line}", root) for v, line in _json_lines(text, name)]
    if not records:
        raise DataError(f"{path}: no records; write a JSON list of records or one record per line")
    return records


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path.name}:{line}: not UTF-8 text; save the file as UTF-8 JSON") from None


def _syntax_error(name: str, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{name}:{line}: not valid JSON ({e.msg}, column {e.colno}); "
                     "fix the file: a JSON list of records, or one record per line (JSON lines)")


def _json_list(text: str, start: int, name: str) -> list[tuple[object, int]]:
    """(value, line) for each element of the JSON list opening at `start`. Decoded
    element by element, rather than with json.loads, so that every record knows its line."""
    decoder = json.JSONDecoder()
    out = []
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    try:
        pos = _WHITESPACE.match(text, start + 1).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                value, end = decoder.raw_decode(text, pos)
                out.append((value, line_at(pos)))
                pos = _WHITESPACE.match(text, end).end()
                if text.startswith(",", pos):
                    pos = _WHITESPACE.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' or ']' after a record", text, pos)
        pos = _WHITESPACE.match(text, pos).end()
        if pos != len(text):
            raise json.JSONDecodeError("Extra data after the list", text, pos)
    except json.JSONDecodeError as e:
        raise _syntax_error(name, e.lineno, e) from None
    return out


def _json_lines(text: str, name: str) -> Iterator[tuple[object, int]]:
    for line, content in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not content.strip():
            continue
        try:
            yield json.loads(content), line
        except json.JSONDecodeError as e:
            raise _syntax_error(name, line, e) from None


# --------------------------------------------------------------------------- record structure


class _Fault(Exception):
    """Internal: a structural fault of one record, turned into a BadRecord."""


def _parse_record(value: object, name: str, line: int, default_id: str, root: Path) -> Record | BadRecord:
    source = f"{name}:{line}"
    record_id = default_id
    try:
        if not isinstance(value, dict):
            raise _Fault(f"not a JSON object (got {_kind(value)}); "
                         "a record is {\"id\", \"image\", \"conversations\"}")
        record_id = _parse_id(value.get("id"), default_id)
        image = root / _parse_image(value.get("image"))
        turns = _parse_turns(value.get("conversations", value.get("messages")))
        category = value.get("category")
        if category is not None and not isinstance(category, str):
            category = json.dumps(category)
        return Record(record_id, image, turns, category, source)
    except _Fault as e:
        return BadRecord(record_id, source, str(e))


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _parse_id(value: object, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    raise _Fault(f"'id' must be a string or a number (got {_kind(value)})")


def _parse_image(value: object) -> str:
    if isinstance(value, list):
        if len(value) > 1:
            raise _Fault(f"{len(value)} images; multi-image records are not supported, give one image per record")
        value = value[0] if value else None
    if value is None or value == "":
        raise _Fault("no 'image'; text-only records are not supported, give each record one image")
    if not isinstance(value, str):
        raise _Fault(f"'image' must be a path string (got {_kind(value)})")
    return value


def _parse_turns(conversation: object) -> list[Turn]:
    if not isinstance(conversation, list):
        raise _Fault("no 'conversations' list of {\"from\", \"value\"} turns")
    if not conversation:
        raise _Fault("empty conversation; give at least the user's turn")
    turns = [_parse_turn(t, n) for n, t in enumerate(conversation, start=1)]
    for n, turn in enumerate(turns, start=1):
        expected = USER if n % 2 == 1 else ASSISTANT
        if turn.role != expected:
            if n == 1:
                raise _Fault("conversation starts with an assistant turn; it must start with the user")
            raise _Fault(f"turns {n - 1} and {n} are both {turn.role} turns; "
                         "turns must alternate user, assistant, user, ...")
    _check_marker(turns)
    return turns


def _parse_turn(turn: object, n: int) -> Turn:
    if not isinstance(turn, dict):
        raise _Fault(f"turn {n} is {_kind(turn)}, not an object with 'from' and 'value'")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role is None or text is None:
        raise _Fault(f"turn {n} has no 'from' and 'value' (or 'role' and 'content')")
    if not isinstance(text, str):
        raise _Fault(f"turn {n}'s text is {_kind(text)}, not a string")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise _Fault(f"turn {n} has unknown role {role!r}; expected human/user or gpt/assistant")
    return Turn(ROLES[role.lower()], text)


def _check_marker(turns: list[Turn]) -> None:
    counts = [t.text.count(IMAGE_MARKER) for t in turns]
    if sum(counts) == 0:
        raise _Fault(f"no {IMAGE_MARKER} marker; put '{IMAGE_MARKER}\\n' in the first user turn where the image goes")
    if sum(counts) > 1:
        raise _Fault(f"{sum(counts)} {IMAGE_MARKER} markers; exactly one is allowed, in the first user turn "
                     "(multi-image records are not supported)")
    if counts[0] == 0:
        n = counts.index(1) + 1
        raise _Fault(f"the {IMAGE_MARKER} marker is in turn {n}; move it to the first user turn")


# --------------------------------------------------------------------------- validation


@dataclasses.dataclass
class DataReport:
    records: list[Record]  # the good records, in file order
    faults: list[str]  # one line per bad (skipped) record

    @property
    def skipped(self) -> int:
        return len(self.faults)

    def summary(self) -> str:
        total = len(self.records) + self.skipped
        return f"{len(self.records)} of {total} records kept, {self.skipped} bad ones skipped"


def check_records(records: Sequence[Record | BadRecord], *, max_prompt_tokens: int | None = None,
                  count_tokens: Callable[[Record], int] | None = None, skip_bad: bool = False,
                  check_images: bool = True, workers: int = 8) -> DataReport:
    """The pass before training: structure (from load_records), image present and
    decodable, prompt within the context. Raises DataError on any fault unless
    skip_bad, which drops bad records and reports them."""
    if (max_prompt_tokens is None) != (count_tokens is None):
        raise ValueError("pass both max_prompt_tokens and count_tokens to check prompt lengths, or neither")
    if not records:
        raise DataError("no records to check; check the data file")
    good = [r for r in records if isinstance(r, Record)]
    image_faults = iter(_image_faults(good, workers) if check_images else [None] * len(good))  # in `good` order

    kept, faults = [], []
    for r in records:
        if isinstance(r, BadRecord):
            faults.append(fault_line(r, r.fault))
            continue
        found = [f for f in (next(image_faults), _length_fault(r, max_prompt_tokens, count_tokens)) if f]
        if found:
            faults.append(fault_line(r, "; ".join(found)))
        else:
            kept.append(r)

    if faults and not skip_bad:
        raise DataError(f"{len(faults)} of {len(records)} records are bad: {_quote(faults)}; "
                        "fix them or pass --skip-bad to skip bad records")
    if not kept:
        raise DataError(f"all {len(records)} records are bad: {_quote(faults)}; fix them, nothing is left to train on")
    return DataReport(kept, faults)


def _quote(faults: list[str]) -> str:
    shown = " | ".join(faults[:SHOWN_FAULTS])
    return shown if len(faults) <= SHOWN_FAULTS else f"{shown} | and {len(faults) - SHOWN_FAULTS} more"


def _length_fault(record: Record, max_tokens: int | None, count_tokens: Callable[[Record], int] | None) -> str | None:
    if count_tokens is None:
        return None
    n = count_tokens(record)
    if n > max_tokens:
        return f"prompt is {n} tokens, longer than the context of {max_tokens}; shorten it or raise the context length"
    return None


def _image_faults(records: list[Record], workers: int) -> list[str | None]:
    """One decode per image, in threads: images often live on slow or network storage."""
    def fault(record: Record) -> str | None:
        try:
            open_rgb(record.image, decode_size=CHECK_DECODE_SIZE)
        except DataError as e:
            return str(e)
        return None

    faults = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeqtl-check") as pool:
        for start in range(0, len(records), CHECK_CHUNK):  # a future per record of a 600k-record file is too many
            faults.extend(pool.map(fault, records[start:start + CHECK_CHUNK]))
    return faults


# --------------------------------------------------------------------------- images


def open_rgb(path: str | Path, decode_size: int | None = None) -> Image.Image:
    """Any image file -> upright RGB (edgeqtl.imageproc.load_image), faults as DataError."""
    try:
        return load_image(path, decode_size)
    except ImageError as e:
        raise DataError(str(e)) from None


# --------------------------------------------------------------------------- loading


class RecordLoader:
    """Batches of (record, image), images decoded lazily in worker threads.

    The training stream is endless and deterministic: epoch e visits the records in
    the order numpy.random.default_rng([seed, e]).permutation(n), epochs follow one
    another without a gap, and batch k holds items k*batch_size ... of that sequence.
    So batch(k) is the same whenever it is asked for, and stream(start=k) resumes a
    run exactly. Only `prefetch` batches ahead are decoded, never the whole file.
    """

    def __init__(self, records: Sequence[Record], batch_size: int, *, seed: int = 0, workers: int = 4,
                 prefetch: int = 2, decode_size: int | None = None, arrays: bool = False):
        bad = next((r for r in records if not isinstance(r, Record)), None)
        if bad is not None:
            raise DataError(f"{fault_line(bad, bad.fault)}; pass the records through check_records first")
        if not records:
            raise DataError("no records to load; check the data file (and --skip-bad's report)")
        if batch_size < 1 or prefetch < 0:
            raise ValueError(f"batch_size must be >= 1 and prefetch >= 0 (got {batch_size}, {prefetch})")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.prefetch = prefetch
        self.decode_size = decode_size
        self.arrays = arrays  # (H, W, 3) uint8 arrays instead of PIL images
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into `records` in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(next(iter(self._orders)))  # the oldest
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        return self._orders[epoch]

    def batch_records(self, step: int) -> list[Record]:
        """The records of training batch `step`, without opening any image."""
        n = len(self.records)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.records[self.epoch_order(p // n)[p % n]] for p in positions]

    def batch(self, step: int) -> list[tuple[Record, Image.Image | np.ndarray]]:
        """Training batch `step`, decoded now."""
        return self.decode(self.batch_records(step))

    def stream(self, start: int = 0) -> Iterator[list[tuple[Record, Image.Image | np.ndarray]]]:
        """The endless training stream from batch `start`, decoded ahead in threads."""
        def steps():
            step = start
            while True:
                yield self.batch_records(step)
                step += 1
        return self._decoded(steps())

    def decode(self, records: list[Record]) -> list[tuple[Record, Image.Image | np.ndarray]]:
        """These records with their images, decoded now (in the worker threads)."""
        return next(self._decoded(iter([records])))

    def in_order(self) -> Iterator[list[tuple[Record, Image.Image | np.ndarray]]]:
        """One pass in file order, the last batch possibly short: for evaluation."""
        b = self.batch_size
        return self._decoded(self.records[i:i + b] for i in range(0, len(self.records), b))

    def __iter__(self):
        return self.in_order()

    def _decoded(self, batches: Iterator[list[Record]]):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="edgeqtl-images")
        pending = collections.deque()
        try:
            for records in batches:
                pending.append((records, [pool.submit(self._image, r) for r in records]))
                if len(pending) > self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _image(self, record: Record) -> Image.Image | np.ndarray:
        try:
            im = open_rgb(record.image, self.decode_size)
        except DataError as e:
            raise DataError(f"{fault_line(record, str(e))}; the file changed since check_records, "
                            "restore it or rerun with --skip-bad") from None
        return np.asarray(im) if self.arrays else im

    @staticmethod
    def _collect(records, futures):
        return [(r, f.result()) for r, f in zip(records, futures)]


# --------------------------------------------------------------------------- shards


_SHARD_STREAM = 0x73686172  # keeps shard draws apart from the loader's [seed, epoch] streams


def shard(records: Sequence[Record], index: int, num_devices: int, seed: int = 0,
          alpha: float | None = None) -> list[Record]:
    """Device `index`'s part of the records, in file order. Every device computes the
    same split of the same records, so the parts are disjoint and cover the file.
    alpha=None: IID, equal sizes. alpha > 0: non-IID by `category`, each category
    spread over the devices in Dirichlet(alpha) proportions (small alpha, more skew)."""
    if not 0 <= index < num_devices:
        raise ValueError(f"device index {index} is outside 0..{num_devices - 1}")
    if len(records) < num_devices:
        raise ValueError(f"{len(records)} records cannot be split among {num_devices} devices; use fewer devices")
    rng = np.random.default_rng([_SHARD_STREAM, seed])
    if alpha is None:
        part = np.array_split(rng.permutation(len(records)), num_devices)[index]
    else:
        part = _dirichlet_parts(records, num_devices, alpha, rng)[index]
    return [records[i] for i in sorted(part)]


def _dirichlet_parts(records: Sequence[Record], num_devices: int, alpha: float,
                     rng: np.random.Generator, tries: int = 100) -> list[list[int]]:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (got {alpha}); omit it for an IID split")
    if all(r.category is None for r in records):
        raise ValueError("a non-IID split needs a 'category' on the records; omit alpha for an IID split")
    by_category = collections.defaultdict(list)
    for i, r in enumerate(records):
        by_category[r.category or ""].append(i)
    for _ in range(tries):  # resample until no device is left empty
        parts = [[] for _ in range(num_devices)]
        for category in sorted(by_category):
            members = rng.permutation(by_category[category])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_devices)) * len(members)).astype(int)[:-1]
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].extend(chunk.tolist())
        if all(parts):
            return parts
    raise ValueError(f"alpha={alpha} leaves some of {num_devices} devices without records; "
                     "raise alpha or use fewer devices")


# --------------------------------------------------------------------------- answers


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD convention: lower case, punctuation removed (not replaced by a
    space), articles dropped, whitespace collapsed."""
    text = text.lower()
    text = "".join(c for c in text if c not in _ASCII_PUNCTUATION and not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """Whether the prediction equals any of the answers after normalize_answer."""
    if isinstance(answers, str):
        answers = [answers]
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(a) for a in answers)


# --------------------------------------------------------------------------- writing


def write_records(path: str | Path, records: Iterable[dict | Record], jsonl: bool = False) -> Path:
    """Write a data file: a JSON list with one record per line, or JSON lines.
    Written beside the target and renamed, so a reader never sees half a file."""
    path = Path(path)
    lines = [json.dumps(r.to_dict() if isinstance(r, Record) else r, ensure_ascii=False) for r in records]
    text = "\n".join(lines) + "\n" if jsonl else "[\n" + ",\n".join(lines) + "\n]\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def write_samples(samples, out_dir: str | Path, name: str = "data", image_first: bool = True) -> Path:
    """A built-in world's samples (image array, question, answer, family) as a data file:
    images/<name>-<i>.png and <name>.json under out_dir, image paths relative to the JSON.
    image_first: where the <image> marker goes, as the world's chat format puts the image
    (the shapes world asks first, then shows the image). Returns the JSON's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(samples):
        sample_id = f"{name}-{i:06d}"
        Image.fromarray(s.image).save(out_dir / "images" / f"{sample_id}.png")
        prompt = f"{IMAGE_MARKER}\n{s.question}" if image_first else f"{s.question} {IMAGE_MARKER}"
        records.append({"id": sample_id, "image": f"images/{sample_id}.png",
                        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": s.answer}],
                        "category": s.family})
    return write_records(out_dir / f"{name}.json", records)
