"""Requests from the CLI to a running daemon (pause, resume, cancel, retry), as files in state/control/.

A request is a small JSON file written durably; the daemon takes each one in order and deletes it. With no
daemon running, the CLI takes the daemon lock and applies the request itself, so a request is never lost
and never applied by two processes. Both apply it through apply(), the one place that says what each does.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from daemon import durable
from daemon.paths import Layout, UserError
from daemon.supervisor import policy
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind
from daemon.supervisor.spool import INPUT, SYMLINK_INPUT, Spool
from daemon.timefmt import now_iso


def control_dir(layout: Layout) -> Path:
    return layout.state / "control"


def paused_flag(layout: Layout) -> Path:
    return layout.state / "paused"


def is_paused(layout: Layout) -> bool:
    return paused_flag(layout).exists()


def request(layout: Layout, action: str, job_id: int | None = None) -> Path:
    assert action in _ACTIONS
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
            raise UserError(f"another training-daemon (pid {holder}) is already running on {self.path.parent.parent}"
                            ) from None
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


def apply(spool: Spool, action: str, job_id: int | None = None, *, status=None,
          current: dict | None = None) -> str | None:
    """Carry out one request and say what was done, in words.

    The CLI calls it when no daemon runs (holding the daemon lock): it gets the words back, and a refusal (no
    such job, a job in the wrong state) raises UserError for the user to see. The daemon calls it for each
    request file with its StatusWriter as `status`: the words and any refusal go to the log (a refusal as a
    warning; the daemon goes on), and with `current`, the job it is training, whose cancel is only flagged
    there (current["cancelled"]) for the daemon to stop the trainer.
    """
    if action not in _ACTIONS:
        return None  # a request file made by hand: nothing this daemon knows how to do
    if action == "cancel" and current and current.get("job_id") == job_id:
        current["cancelled"] = True
        return None
    event, handler = _ACTIONS[action]
    try:
        message = handler(spool, job_id)
    except UserError as e:
        if status is None:
            raise
        status.event(event, str(e), level="warning", job_id=job_id)
        return None
    if status is None:
        return _WITHOUT_DAEMON.get(action, message)
    status.event(event, message)
    return message


def _pause(spool: Spool, _job_id: int | None) -> str:
    paused_flag(spool.layout).touch()
    return "paused: no new job starts; a running job checkpoints and waits"


def _resume(spool: Spool, _job_id: int | None) -> str:
    paused_flag(spool.layout).unlink(missing_ok=True)
    return "resumed"


def cancel_job(spool: Spool, job_id: int) -> str:
    """Cancel a pending job (a running one is cancelled by the daemon, which kills its trainer)."""
    job = _job_in(spool, job_id, JobStatus.PENDING, "cancel")
    policy.decide(Outcome(OutcomeKind.CANCELLED, "cancelled by user"), job.attempts).apply_to(job, now_iso())
    spool.move(job, JobStatus.FAILED)
    return f"job {job_id} cancelled"


def check_retry(spool: Spool, job_id: int) -> Job:
    """The failed job `job_id`, if it can be queued again; else UserError saying why not."""
    job = _job_in(spool, job_id, JobStatus.FAILED, "retry")
    folder = spool.job_dir(job)
    if not (folder / INPUT).is_file() or (folder / INPUT).is_symlink():
        what = ("it was a symlink, which is never followed" if os.path.lexists(folder / SYMLINK_INPUT)
                else "it has no regular input file")
        raise UserError(f"retry: job {job_id} cannot be queued again: {what}; drop the real file into the inbox")
    return job


def retry_job(spool: Spool, job_id: int) -> str:
    """Send a failed job back to the queue; its earlier attempts stay in its history."""
    job = check_retry(spool, job_id)
    mark = {"n": len(job.attempts) + 1, "outcome": OutcomeKind.RETRIED_BY_USER, "started_at": now_iso()}
    job.attempts.append(mark)
    decision = policy.decide(Outcome(OutcomeKind.RETRIED_BY_USER), job.attempts)
    decision.apply_to(job, now_iso())
    spool.move(job, decision.state)
    return f"job {job_id} queued again"


# action: (the event the daemon logs it as, what it does: (spool, job_id) -> what was done, in words)
_ACTIONS = {
    "pause": ("paused", _pause),
    "resume": ("resumed", _resume),
    "cancel": ("cancel", cancel_job),
    "retry": ("retry", retry_job),
}
# The daemon's words speak of a running daemon; the CLI applies a request itself only when none runs.
_WITHOUT_DAEMON = {"pause": "paused (no daemon is running; it starts paused)"}


def _job_in(spool: Spool, job_id: int, state: JobStatus, action: str) -> Job:
    found = spool.get(job_id)
    if found is None:
        raise UserError(f"{action}: no job {job_id}")
    job, _ = found
    if job.state != state:
        raise UserError(f"{action}: job {job_id} is {job.state}, not {state}")
    return job
