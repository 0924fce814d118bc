"""A job's manifest: job.json in its folder queue/<state>/j<id>/.

The folder a job is in is the truth for its state: a crash between writing job.json and renaming the
folder leaves a manifest that disagrees, so load() takes the state from the folder. A manifest that cannot be
read (cut short, not JSON, fields missing) raises ManifestError saying what is wrong with it, so that whoever
lists jobs can show the job as broken instead of leaving it out.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from daemon import durable

MANIFEST = "job.json"
INPUT = "input.jsonl"  # the user's bytes, unchanged
# What a rebuilt manifest says for a field nothing in the job's folder could tell (never a valid adapter name).
UNKNOWN = "?"


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:  # f"{state}" and path joins give "pending", not "JobStatus.PENDING"
        return self.value


def dir_name(job_id: int) -> str:
    return f"j{job_id:06d}"


def parse_dir_name(name: str) -> int | None:
    """The id in a job folder's name, or None for anything else (temp folders, stray files)."""
    if len(name) >= 7 and name[0] == "j" and name[1:].isdigit():
        return int(name[1:])
    return None


@dataclass
class Job:
    id: int
    adapter: str
    original_name: str
    sha256: str | None = None  # None only for a job that never had bytes (a symlink)
    size: int | None = None
    submitted_at: str | None = None  # when the file was seen in the inbox
    queued_at: str | None = None  # when the job folder was complete
    started_at: str | None = None
    finished_at: str | None = None
    # One dict per try: {n, started_at, ended_at, outcome, error, exit_code, micro_batch_size}
    attempts: list[dict] = field(default_factory=list)
    state: JobStatus = JobStatus.PENDING
    version: int | None = None
    error: str | None = None
    note: str | None = None
    duplicate_of: int | None = None
    micro_batch_size: int | None = None  # the override set after out-of-memory retries
    # Set only on a stand-in for a folder whose job.json cannot be read (why not); such a Job is never saved.
    unreadable: str | None = None

    def __post_init__(self) -> None:
        self.state = JobStatus(self.state)

    @property
    def dir_name(self) -> str:
        return dir_name(self.id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        if self.unreadable is None:
            del d["unreadable"]  # only a stand-in carries it: `jobs --json` shows it for those alone
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        # Unknown keys are dropped rather than fatal: a manifest from a newer daemon still loads.
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})

    @classmethod
    def load(cls, job_dir: str | os.PathLike) -> "Job":
        """The job whose folder is job_dir; OSError if its job.json cannot be opened, ManifestError if it
        opens but does not hold a job."""
        job_dir = os.path.normpath(os.fspath(job_dir))
        with open(os.path.join(job_dir, MANIFEST), "rb") as f:
            raw = f.read()
        data = _manifest_fields(raw, parse_dir_name(os.path.basename(job_dir)))
        folder = os.path.basename(os.path.dirname(job_dir))
        if folder in JobStatus._value2member_map_:
            data["state"] = folder
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"job.json does not hold a job: {e}") from None

    def save(self, job_dir: str | os.PathLike) -> None:
        # A stand-in's fields are guesses: writing them would overwrite the manifest the user may still repair.
        assert self.unreadable is None, "a job whose job.json could not be read is never saved as it is"
        durable.write_json(Path(job_dir) / MANIFEST, self.to_dict())


class ManifestError(ValueError):
    """A job.json that opens but does not hold a job; the message says what is wrong with it."""


def _manifest_fields(raw: bytes, folder_id: int | None) -> dict:
    try:
        data = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        what = "is empty" if not raw.strip() else f"is not valid JSON ({e})"
        raise ManifestError(f"job.json {what}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"job.json holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"job.json lacks {', '.join(missing)}")
    wrong = [k for k, kind in _REQUIRED.items() if not _of(data[k], kind)]
    wrong += [k for k, kind in _NULLABLE.items() if data.get(k) is not None and not _of(data[k], kind)]
    if "attempts" in data and not (isinstance(data["attempts"], list) and all(isinstance(a, dict)
                                                                             for a in data["attempts"])):
        wrong.append("attempts")
    if wrong:
        raise ManifestError("job.json has a wrong type for " + ", ".join(f"{k} ({data[k]!r:.40})" for k in wrong))
    if folder_id is not None and data["id"] != folder_id:
        raise ManifestError(f"job.json is job {data['id']}'s, but its folder is {dir_name(folder_id)}")
    return data


def _of(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # True is an int to Python, not an id


_REQUIRED = {"id": int, "adapter": str, "original_name": str}
_NULLABLE = {"version": int, "size": int, "micro_batch_size": int, "sha256": str}
# What a manifest on disk may set: `unreadable` is the stand-in's own, never read from a file.
_FIELDS = frozenset(f.name for f in fields(Job)) - {"unreadable"}
