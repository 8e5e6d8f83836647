"""The long-running device agent: jobs in, answers out, as JSON lines. Never imports torch.

A job is one JSON object per line:
    {"id": "cam1-0001", "image": "frames/0001.png", "prompt": "how many shapes are there ?"}
("id" is optional; relative image paths are taken from the job file's folder; a job may
also set "max_new_tokens", "temperature", "top_p", "seed" and "stop", as `device ask`
does). Jobs about an image the server already holds send it by reference. Each job
gets exactly one answer line, in job order:
    {"id": ..., "answer": "3", "tokens": 1, "latency_ms": 41.2, "bytes_up": 318, "bytes_up_fp16": 3810, ...}
or, when the job itself is bad (no such image, a server refusal), {"id": ..., "error": "..."}.

Transport failures are not job failures: while the broker or every server is down the
job is retried with backoff (paho reconnects underneath), so an agent left alone on a
device rides out broker restarts and loses nothing. In a watched folder, answers are
written (and flushed) line by line to answers/<name>, and a job file moves to done/
when all its jobs are answered; an agent restarted halfway skips the jobs already
answered.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import IO, Iterable, Iterator

from edgeqtl.errors import EdgeqtlError
from edgeqtl.transport import BrokerConfig, BrokerUnavailable, RequestClient, TransportError
from edgeqtl.wire import InferOptions, ProtocolError

from .client import DeviceClient

log = logging.getLogger("edgeqtl.device")
# One JSON object per job, for a log shipper (`device run` prints these on stderr as they are).
job_log = logging.getLogger("edgeqtl.device.jobs")


def log_job(result: dict, seconds: float) -> None:
    if not job_log.isEnabledFor(logging.INFO):
        return
    line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": "job", "id": result.get("id"),
            "ok": "error" not in result, "seconds": round(seconds, 3)}
    line.update({k: result[k] for k in ("tokens", "latency_ms", "bytes_up", "round_trips", "image_by_reference",
                                        "error") if k in result})
    job_log.info(json.dumps(line))


class JobError(EdgeqtlError, ValueError):
    """A job line that is not a job."""


GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


@dataclasses.dataclass
class Job:
    id: str
    image: Path
    prompt: str
    options: InferOptions = dataclasses.field(default_factory=InferOptions)


def parse_job(line: str, base_dir: Path, default_id: str) -> Job:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise JobError(f"not a JSON object: {e}") from None
    if not isinstance(d, dict):
        raise JobError("a job is a JSON object with \"image\" and \"prompt\"")
    missing = [k for k in ("image", "prompt") if not isinstance(d.get(k), str) or not d.get(k)]
    if missing:
        raise JobError(f"job has no {' or '.join(missing)} (a non-empty string)")
    image = Path(d["image"])
    try:
        options = InferOptions.from_json({k: d[k] for k in GENERATION_FIELDS if k in d})
    except ProtocolError as e:
        raise JobError(str(e).replace("INFER_REQUEST options: ", "")) from None
    return Job(str(d.get("id", default_id)), image if image.is_absolute() else base_dir / image, d["prompt"], options)


def connect(cfg: BrokerConfig, device_id: str, max_backoff: float = 30.0, give_up_s: float | None = None,
            sleep=time.sleep) -> RequestClient:
    """A started RequestClient, waiting (with backoff) for a broker that is not up yet."""
    delay, t0 = 1.0, time.monotonic()
    while True:
        try:
            return RequestClient(cfg, device_id).start(timeout=5)
        except BrokerUnavailable as e:
            if give_up_s is not None and time.monotonic() - t0 > give_up_s:
                raise
            log.warning("%s; trying again in %.0f s", e, delay)
            sleep(delay)
            delay = min(2 * delay, max_backoff)


class DeviceRunner:
    def __init__(self, client: DeviceClient, transport: RequestClient, timeout: float = 10.0,
                 max_backoff: float = 30.0, give_up_s: float | None = None):
        """give_up_s: how long one job may wait for the broker and a server before it is
        answered with an error (None: wait for ever, the right default unattended)."""
        self.client = client
        self.transport = transport
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.give_up_s = give_up_s

    def answer(self, job: Job) -> dict:
        t0 = time.monotonic()
        result = self._answer(job)
        log_job(result, time.monotonic() - t0)
        return result

    def _answer(self, job: Job) -> dict:
        delay, t0 = 0.5, time.monotonic()
        while True:
            try:
                a = self.client.ask(self.transport, job.image, job.prompt, timeout=self.timeout, options=job.options)
                return {"id": job.id, "prompt": job.prompt, "image": str(job.image), "answer": a.text,
                        "tokens": a.tokens, "latency_ms": round(1e3 * a.latency_s, 2), "bytes_up": a.bytes_up,
                        "bytes_up_fp16": a.bytes_up_fp16, "round_trips": a.round_trips, "image_by_reference": a.image_by_reference}
            except TransportError as e:  # broker or servers down: wait and try again
                if self.give_up_s is not None and time.monotonic() - t0 > self.give_up_s:
                    return {"id": job.id, "prompt": job.prompt, "image": str(job.image),
                            "error": f"gave up after {self.give_up_s:.0f} s: {e}"}
                log.warning("job %s: %s; trying again in %.1f s", job.id, e, delay)
                time.sleep(delay)
                delay = min(2 * delay, self.max_backoff)
            except (EdgeqtlError, OSError) as e:  # the job's own fault: a bad image, a refusal by the server
                return {"id": job.id, "prompt": job.prompt, "image": str(job.image), "error": str(e)}
            except Exception as e:  # noqa: BLE001 - a bug: logged whole, the job answered, the agent goes on
                log.exception("job %s failed", job.id)
                return {"id": job.id, "prompt": job.prompt, "image": str(job.image),
                        "error": f"internal error ({type(e).__name__}: {e}); see the agent's log"}

    def run_lines(self, lines: Iterable[str], out: IO[str], base_dir: Path, name: str = "job",
                  skip: set[str] = frozenset()) -> int:
        """Answer each job line; returns how many answer lines were written."""
        n = 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                job = parse_job(line, base_dir, f"{name}-{i + 1}")
            except JobError as e:
                result = {"id": f"{name}-{i + 1}", "error": f"line {i + 1}: {e}"}
                log_job(result, 0.0)
            else:
                if job.id in skip:
                    continue
                result = self.answer(job)
            out.write(json.dumps(result) + "\n")
            out.flush()
            n += 1
        return n

    def watch(self, folder: Path, poll_s: float = 1.0, once: bool = False) -> Iterator[Path]:
        """Answer every *.jsonl dropped into `folder`; yields each finished job file's
        new path (in done/). once=True: stop when no job file is left."""
        answers, done = folder / "answers", folder / "done"
        answers.mkdir(parents=True, exist_ok=True)
        done.mkdir(exist_ok=True)
        while True:
            jobs = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
            for path in jobs:
                out_path = answers / path.name
                answered = _answered_ids(out_path)
                with path.open() as src, out_path.open("a") as out:
                    self.run_lines(src, out, folder, path.stem, skip=answered)
                target = done / path.name
                path.replace(target)
                yield target
            if once and not jobs:
                return
            if not jobs:
                time.sleep(poll_s)


def _answered_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash: that job runs again
    return ids
