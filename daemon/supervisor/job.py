"""A job's manifest: job.json in its folder queue/<state>/j<id>/.

The folder a job is in is the truth for its state: a crash between writing job.json and renaming the
folder leaves a manifest that disagrees, so load() takes the state from the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from daemon import durable

MANIFEST = "job.json"


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

    def __post_init__(self) -> None:
        self.state = JobStatus(self.state)

    @property
    def dir_name(self) -> str:
        return dir_name(self.id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        # Unknown keys are dropped rather than fatal: a manifest from a newer daemon still loads.
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})

    @classmethod
    def load(cls, job_dir: str | os.PathLike) -> "Job":
        job_dir = os.path.normpath(os.fspath(job_dir))
        with open(os.path.join(job_dir, MANIFEST), "rb") as f:
            job = cls.from_dict(json.loads(f.read()))
        folder = os.path.basename(os.path.dirname(job_dir))
        if folder in JobStatus._value2member_map_:
            job.state = JobStatus(folder)
        return job

    def save(self, job_dir: str | os.PathLike) -> None:
        durable.write_json(Path(job_dir) / MANIFEST, self.to_dict())


_FIELDS = frozenset(f.name for f in fields(Job))
