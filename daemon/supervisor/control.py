"""Requests from the CLI to a running daemon (pause, resume, cancel, retry), as files in state/control/.

A request is a small JSON file written durably; the daemon takes each one in order and deletes it. With no
daemon running, the CLI takes the daemon lock and applies the request itself, so a request is never lost
and never applied by two processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from daemon import durable
from daemon.paths import Layout, UserError

ACTIONS = ("pause", "resume", "cancel", "retry")


def control_dir(layout: Layout) -> Path:
    return layout.state / "control"


def paused_flag(layout: Layout) -> Path:
    return layout.state / "paused"


def is_paused(layout: Layout) -> bool:
    return paused_flag(layout).exists()


def request(layout: Layout, action: str, job_id: int | None = None) -> Path:
    assert action in ACTIONS
    d = control_dir(layout)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{time.time_ns():020d}-{action}.json"
    durable.write_json(path, {"action": action, "job_id": job_id})
    return path


def take(layout: Layout) -> list[dict]:
    d = control_dir(layout)
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
        f.unlink(missing_ok=True)
    return out


class DaemonLock:
    """One daemon per root: an flock held for the life of the process (released by the kernel on death)."""

    def __init__(self, layout: Layout):
        self.path = layout.lock
        self.fd: int | None = None

    def acquire(self) -> "DaemonLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another training-daemon (pid {holder}) is already running on {self.path.parent.parent}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def try_acquire(self) -> bool:
        try:
            self.acquire()
            return True
        except UserError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def daemon_pid(layout: Layout) -> int | None:
    """The running daemon's pid, or None if no daemon holds the lock."""
    lock = DaemonLock(layout)
    if lock.try_acquire():
        lock.release()
        return None
    try:
        return int(layout.lock.read_text().strip())
    except (OSError, ValueError):
        return -1


def cancel_job(spool, job_id: int) -> str:
    """Cancel a pending job (a running one is cancelled by the daemon, which kills its trainer)."""
    from daemon.supervisor.job import JobStatus

    job = _job_in(spool, job_id, JobStatus.PENDING, "cancel")
    job.error = "cancelled by user"
    spool.move(job, JobStatus.FAILED)
    return f"job {job_id} cancelled"


def check_retry(spool, job_id: int):
    """The failed job `job_id`, if it can be queued again; else UserError saying why not."""
    from daemon.supervisor.job import JobStatus
    from daemon.supervisor.spool import INPUT, SYMLINK_INPUT

    job = _job_in(spool, job_id, JobStatus.FAILED, "retry")
    folder = spool.job_dir(job)
    if not (folder / INPUT).is_file() or (folder / INPUT).is_symlink():
        what = ("it was a symlink, which is never followed" if os.path.lexists(folder / SYMLINK_INPUT)
                else "it has no regular input file")
        raise UserError(f"retry: job {job_id} cannot be queued again: {what}; drop the real file into the inbox")
    return job


def retry_job(spool, job_id: int) -> str:
    """Send a failed job back to the queue; its earlier attempts stay in its history."""
    from daemon.supervisor.job import JobStatus
    from daemon.supervisor.status import now_iso

    job = check_retry(spool, job_id)
    job.attempts.append({"n": len(job.attempts) + 1, "outcome": "retried_by_user", "started_at": now_iso()})
    job.error = None
    job.micro_batch_size = None
    spool.move(job, JobStatus.PENDING)
    return f"job {job_id} queued again"


def _job_in(spool, job_id: int, state, action: str):
    found = spool.get(job_id)
    if found is None:
        raise UserError(f"{action}: no job {job_id}")
    job, _ = found
    if job.state != state:
        raise UserError(f"{action}: job {job_id} is {job.state}, not {state}")
    return job
