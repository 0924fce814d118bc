"""Where everything lives under a root directory.

The root holds the runtime folders (inbox/, queue/<state>/, checkpoints/) and the status files.
`queue/` is a data folder, never a Python package: a queue/__init__.py would shadow the stdlib.
The job states, and so the folders inside queue/, are the spool's (daemon.supervisor.job.JobStatus).
"""

from __future__ import annotations

import os
import re
import stat
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


# Folders the system owns: a root here would scatter inbox/, queue/, state/ among system files (or, for /tmp, into a
# folder every local user can create names in first). /proc, /sys and /dev are refused with everything below them.
SYSTEM_FOLDERS = frozenset(["/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
                            "/media", "/mnt", "/opt", "/proc", "/run", "/sbin", "/srv", "/sys", "/tmp",
                            "/usr", "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/local", "/usr/sbin", "/usr/share",
                            "/var", "/var/lib", "/var/log", "/var/tmp"])
VIRTUAL_TREES = ("/proc", "/sys", "/dev")
_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def root_problem(root: str | os.PathLike) -> str | None:
    """Why `root` cannot be a data root (a system folder, or something that is not a folder), or None."""
    path = Path(root).expanduser().resolve()
    text = str(path)
    if text in SYSTEM_FOLDERS or any(text.startswith(tree + "/") for tree in VIRTUAL_TREES):
        return f"{text} is a system folder: choose a folder of its own, like /var/lib/training-daemon"
    if path.exists() and not path.is_dir():
        return f"{text} is not a folder"
    return None


def check_root(root: str | os.PathLike) -> Path:
    problem = root_problem(root)
    if problem:
        raise UserError(f"invalid data root: {problem}")
    return Path(root)


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Refuse a device, a FIFO or a socket before opening it: reading /dev/zero never ends, opening a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {os.fspath(path)} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {os.fspath(path)}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {os.fspath(path)} is {file_kind(mode)}, not a regular file")
    return Path(path)


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
