"""Where everything lives under a root directory.

The root holds the runtime folders (inbox/, queue/<state>/, checkpoints/) and the status files.
`queue/` is a data folder, never a Python package: a queue/__init__.py would shadow the stdlib.
The job states, and so the folders inside queue/, are the spool's (daemon.supervisor.job.JobStatus).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = "default"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class UserError(Exception):
    """A problem the user can fix; shown as one clear message, never a traceback."""

    exit_code = 1


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name) or name in (".", "..") or ".." in name:
        raise UserError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "not starting with '.' or '-' and without '..'"
        )
    return name


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Layout":
        return cls(Path(root).expanduser().resolve())

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    def state_dir(self, state: str) -> Path:
        """queue/<state>/ for one of the spool's states (JobStatus): the spool makes these folders."""
        return self.queue / str(state)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def adapter_dir(self, adapter: str) -> Path:
        return self.checkpoints / check_adapter_name(adapter)

    @property
    def state(self) -> Path:
        """Daemon bookkeeping: the job-id counter, the lock, control requests."""
        return self.root / "state"

    @property
    def counter(self) -> Path:
        return self.state / "next_job_id"

    @property
    def lock(self) -> Path:
        return self.state / "daemon.lock"

    @property
    def status_log(self) -> Path:
        return self.root / "status.log"

    @property
    def status_json(self) -> Path:
        return self.root / "status.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    def ensure(self) -> "Layout":
        for d in [self.inbox, self.queue, self.checkpoints, self.state]:
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        return self

    def check_same_filesystem(self) -> None:
        """os.rename is atomic only within one filesystem: refuse to start across two."""
        devices = {p: os.stat(p).st_dev for p in [self.inbox, self.queue, self.checkpoints, self.state]}
        if len(set(devices.values())) > 1:
            listing = ", ".join(f"{p} (dev {d})" for p, d in devices.items())
            raise UserError(f"inbox/, queue/, checkpoints/ and state/ must be on one filesystem: {listing}")
