"""The standing eval set of an adapter: `versions.eval_file`, or else the adapter's eval pool (docs/trust.md).

The pool, checkpoints/<adapter>/eval_pool.jsonl, collects the held-out split of every promoted job's file, so a
later version is measured on earlier files' data too. Each line is the raw JSON record as the user wrote it, plus
a "_pool" key (job, file, the record's sha256): other keys are ignored by every format, so the pool, and each
version's copy of the set it was judged on (standing_eval.jsonl), stays a readable data file. Records are
deduplicated by the sha256 of their canonical JSON, and the pool is bounded by versions.eval_pool_max_examples:
when it overflows, each source file keeps an equal share (a file with fewer records keeps them all, the rest is
shared by the others; a remainder goes one each to the newest files), so one big file never crowds out the
earlier ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from daemon import durable

POOL = "eval_pool.jsonl"
STANDING_COPY = "standing_eval.jsonl"  # in each version folder: the exact set it was judged on


class EvalFileError(Exception):
    """versions.eval_file cannot serve as the standing set (the message names the file and the line)."""


@dataclass
class StandingSet:
    source: str  # "eval_file" | "pool" | "none"
    path: str | None = None
    sha256: str | None = None
    data: bytes = b""  # the exact bytes judged on (copied into the version folder)
    examples: list = field(default_factory=list)  # TokenizedExample
    notes: list[str] = field(default_factory=list)

    def to_metadata(self) -> dict:
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "examples": len(self.examples)}


def record_sha256(record: dict) -> str:
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def raw_records(path: Path, lines: set[int], max_line_bytes: int) -> list[dict]:
    """The JSON objects on the given 1-based lines of a data file (already validated), in file order."""
    from daemon.trainer.formats import BOM, read_lines

    out = []
    with open(path, "rb") as f:
        for raw in read_lines(f, max_line_bytes):
            if raw.number in lines and raw.data is not None:
                data = raw.data.removeprefix(BOM) if raw.number == 1 else raw.data
                obj = json.loads(data.decode("utf-8"))
                if isinstance(obj, dict):
                    out.append(obj)
    return out


def read_pool(adapter_dir: Path, unreadable: list[int] | None = None) -> tuple[list[dict], bytes]:
    """The pool's entries (raw records with their "_pool" key) and its bytes; empty when there is none. A line
    that is not JSON (a damaged disk block, a hand edit) is skipped, its 1-based number added to `unreadable`:
    one bad line must not fail every later job of the adapter."""
    path = adapter_dir / POOL
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], b""
    entries = []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
                if unreadable is not None:
                    unreadable.append(number)
                continue
            if isinstance(obj, dict) and isinstance(obj.get("_pool"), dict):
                entries.append(obj)
    return entries, data


def trim(entries: list[dict], limit: int) -> list[dict]:
    """At most `limit` entries, each source job keeping an equal share (water-filling), in their order."""
    if len(entries) <= limit:
        return entries
    by_job: dict = {}
    for e in entries:
        by_job.setdefault(e["_pool"].get("job_id"), []).append(e)
    quota: dict = {}
    left, open_jobs = limit, sorted(by_job, key=lambda j: len(by_job[j]))
    while open_jobs:
        share = left // len(open_jobs)
        newest = sorted(open_jobs, key=_job_order, reverse=True)
        if share == 0:  # more files than room: the newest files (by job id) keep one each
            for j in newest:
                quota[j] = 1 if left > 0 else 0
                left -= quota[j]
            break
        j = open_jobs[0]
        if len(by_job[j]) <= share:
            quota[j] = len(by_job[j])
            left -= quota[j]
            open_jobs.pop(0)
        else:
            for j in open_jobs:
                quota[j] = share
            left -= share * len(open_jobs)
            for j in newest[:left]:  # the remainder, one each, to the newest files (by job id)
                quota[j] += 1
            break
    kept: dict = {j: 0 for j in by_job}
    out = []
    for e in entries:
        j = e["_pool"].get("job_id")
        if kept[j] < quota.get(j, 0):
            kept[j] += 1
            out.append(e)
    return out


def _job_order(job_id) -> int:
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else -1  # no job id: the oldest


def add_split(adapter_dir: Path, records: list[dict], job_id: int, source_file: str, limit: int) -> dict:
    """Add a job's held-out records to the pool (rank 0, at publish): deduplicated, bounded, written durably.
    Returns the metadata's "eval_pool": the pool as it is after this job."""
    entries, _ = read_pool(adapter_dir)
    seen = {e["_pool"].get("sha256") for e in entries}
    added = 0
    for record in records:
        body = {k: v for k, v in record.items() if k != "_pool"}
        digest = record_sha256(body)
        if digest in seen:
            continue
        seen.add(digest)
        entries.append({**body, "_pool": {"job_id": job_id, "file": source_file, "sha256": digest}})
        added += 1
    entries = trim(entries, limit)
    data = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in entries)
    if entries or (adapter_dir / POOL).exists():
        adapter_dir.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(adapter_dir / POOL, data)
    return {"path": str(adapter_dir / POOL), "sha256": hashlib.sha256(data).hexdigest() if entries else None,
            "examples": len(entries), "added": added}


def load_standing_set(cfg, adapter_dir: Path, tokenizer, base_dir: Path) -> StandingSet:
    """The set every version of this adapter is measured on: the eval file, else the pool as it is before this
    job, tokenized with this job's settings. A broken eval file raises EvalFileError; a pool record that no longer
    fits (a smaller max_length, say) is left out with a note."""
    v = cfg.versions
    if v.eval_file:
        return _eval_file(cfg, Path(v.eval_file), tokenizer, base_dir)
    if v.eval_pool_max_examples == 0:
        return StandingSet("none", notes=["no eval pool (versions.eval_pool_max_examples: 0)"])
    unreadable: list[int] = []
    entries, data = read_pool(adapter_dir, unreadable)
    skipped = ([f"{len(unreadable)} eval pool line(s) are not JSON ({POOL} line "
                f"{', '.join(map(str, unreadable[:10]))}{', ...' if len(unreadable) > 10 else ''}): left out"]
               if unreadable else [])
    if not entries:
        return StandingSet("none", notes=skipped)
    from daemon.trainer.data import tokenize_examples
    from daemon.trainer.formats import Rejection, check_record, detect_format

    t = cfg.training
    examples, rejected = [], 0
    checked = []
    for i, entry in enumerate(entries, 1):
        record = {k: val for k, val in entry.items() if k != "_pool"}
        fmt = detect_format(record, i)
        ex = fmt if isinstance(fmt, Rejection) else check_record(record, fmt, i, t.train_on_inputs)
        if isinstance(ex, Rejection):
            rejected += 1
        else:
            checked.append(ex)
    for ex in tokenize_examples(tokenizer, checked, t.max_length, t.train_on_inputs, t.too_long) if checked else []:
        if isinstance(ex, Rejection):
            rejected += 1
        else:
            examples.append(ex)
    notes = skipped + ([f"{rejected} eval pool records do not fit this job's settings: left out"] if rejected else [])
    return StandingSet("pool", str(adapter_dir / POOL), hashlib.sha256(data).hexdigest(), data, examples, notes)


def _eval_file(cfg, path: Path, tokenizer, base_dir: Path) -> StandingSet:
    from daemon.trainer.data import validate_for_config

    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalFileError(f"versions.eval_file {path} cannot be read: {e.strerror or e}") from None
    report = validate_for_config(path, tokenizer, cfg, base_dir=base_dir, keep_examples=True)
    if report.format == "preference":  # every version is measured by its token loss on supervised examples
        raise EvalFileError(f"versions.eval_file must be a supervised file (messages, prompt/completion, ...), not "
                            f"preference pairs: {path}")
    if not report.ok or report.skipped:
        first = report.errors[0]["message"] if report.errors else (report.fatal or {}).get("message", "")
        raise EvalFileError(f"versions.eval_file {path} is not a usable eval set: {report.render().splitlines()[0]}"
                            + (f"; {first}" if first and first not in report.render().splitlines()[0] else ""))
    return StandingSet("eval_file", str(path), hashlib.sha256(data).hexdigest(), data, report.examples_list)
