"""Requests from the CLI to a running daemon (pause, resume, cancel, retry), as files in state/control/.

A request is a small JSON file written durably; the daemon takes each one in order and deletes it. With no
daemon running, the CLI takes the daemon lock and applies the request itself, so a request is never lost
and never applied by two processes. Both apply it through apply(), the one place that says what each does.

Control commands take turns (state/control.lock, see turn()), and a daemon takes its lock only in a turn too:
so a command that finds the daemon lock held knows a daemon holds it, never a racing command, and writes a
request only for a running daemon. Requests are applied in the order they were made: one left by a daemon
that stopped before taking it is applied by whoever holds the daemon lock next (a command, before its own
request, or the next daemon at its start), so a later command never comes before an earlier one.

`retry` gives the job the config a job of its adapter would get if it started now (the config file and the
adapter's override as they are now), recording in the job's history which keys changed; `retry --same-config`
keeps the job's config.json snapshot. A retry request carries that choice to the daemon.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon import durable
from daemon.flock import lock_within
from daemon.paths import Layout, UserError
from daemon.supervisor import policy
from daemon.supervisor.job import INPUT, UNKNOWN, Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind
from daemon.supervisor.spool import SYMLINK_INPUT, Spool
from daemon.supervisor.status import StatusWriter
from daemon.timefmt import now_iso

SNAPSHOT = "config.json"  # the job's effective config, as the trainer reads it
# How many changed keys a status line names; the job's history keeps them all.
SHOWN_CHANGES = 8

# adapter -> the effective config (effective_dict) a job of that adapter would start with now
CurrentConfig = Callable[[str], dict]


def control_dir(layout: Layout) -> Path:
    return layout.state / "control"


def paused_flag(layout: Layout) -> Path:
    return layout.state / "paused"


def is_paused(layout: Layout) -> bool:
    return paused_flag(layout).exists()


def request(layout: Layout, action: str, job_id: int | None = None, *, same_config: bool = False) -> Path:
    assert action in _ACTIONS
    d = control_dir(layout)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{time.time_ns():020d}-{action}.json"
    durable.write_json(path, {"action": action, "job_id": job_id, "same_config": same_config})
    return path


def current_config(config_path: Path | None, root: str | os.PathLike | None) -> CurrentConfig:
    """What `retry` gives a job: the config files as they are now (read at the call), with the adapter's override.
    Raises ConfigError listing every problem."""
    def effective(adapter: str) -> dict:
        # Imported here: pydantic and yaml are not needed by pause, resume, cancel or `status`.
        from daemon.config import adapter_config, effective_dict, load_config

        cfg = load_config(config_path, Path(root) if root else None)
        return effective_dict(adapter_config(cfg, adapter, config_path or cfg.source_path))

    return effective


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


TURN_LOCK = "control.lock"  # in state/: held by one control command at a time, and by a daemon taking its lock
TURN_WAIT_SECONDS = 60.0  # a `retry` reads the config in its turn: seconds on a loaded machine, never a minute


@contextmanager
def turn(layout: Layout, wait: float = TURN_WAIT_SECONDS) -> Iterator[None]:
    """This process's turn among control commands and daemon starts on the root: waits (at most `wait` s) while
    another has it. UserError if it does not come."""
    layout.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.state / TURN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        lock_within(fd, wait, f"another training-daemon command on {layout.root} has not finished in {wait:.0f}s; "
                    "try again")
        yield
    finally:
        os.close(fd)


class DaemonLock:
    """One daemon per root: an flock held for the life of the process (released by the kernel on death)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.path = layout.lock
        self.fd: int | None = None

    def acquire(self) -> "DaemonLock":
        """The daemon's lock, for its life; taken in a turn (a control command finishes first)."""
        with turn(self.layout):
            return self._take()

    def _take(self) -> "DaemonLock":
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
        """For a control command in its turn(): whether no daemon runs (the lock is then ours until release)."""
        try:
            self._take()
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
    with turn(layout):  # the probe takes the lock for a moment: a control command must not take that for a daemon
        if lock.try_acquire():
            lock.release()
            return None
    try:
        return int(layout.lock.read_text().strip())
    except (OSError, ValueError):
        return -1


def command(layout: Layout, action: str, job_id: int | None = None, *, current: CurrentConfig,
            same_config: bool = False) -> str:
    """A control command from the CLI, in its turn. With no daemon running it is applied here, under the daemon
    lock, after any request a stopped daemon left (in order); else it is checked as the daemon would check it,
    so a refusal is the user's one-line error now, and handed to the daemon as a request. `current`: the config
    a retried job takes (current_config()), unless `same_config`. What was done, in words; UserError if refused.
    """
    spool = Spool(layout)
    config = None if same_config else current
    lock = DaemonLock(layout)
    with turn(layout):
        if not lock.try_acquire():
            check(spool, action, job_id, config)
            request(layout, action, job_id, same_config=same_config)
            return f"{action} requested; the daemon applies it within a second"
        try:
            status = StatusWriter(layout, echo=False)  # status.log tells what happened to the queue, whoever did it
            said = apply_left_over(spool, status, current)
            message = apply(spool, action, job_id, config=config)
            status.event(event_name(action), message, job_id=job_id, by="cli")
        finally:
            lock.release()
    return "\n".join(said + [message])


def apply_left_over(spool: Spool, status: StatusWriter, current: CurrentConfig) -> list[str]:
    """Requests left by a daemon that stopped before taking them, applied as it would have, in the order they
    were made (by a command that found no daemon, before its own); what each came to, in words."""
    said = []
    for req in take(spool.layout):
        action = req.get("action")
        config = None if req.get("same_config") else current
        message = apply(spool, action, req.get("job_id"), config=config, status=status)
        said.append(f"first, an earlier {action} request the daemon stopped before taking: "
                    + (message or "not applied (status.log says why)"))
    return said


def check(spool: Spool, action: str, job_id: int | None, config: CurrentConfig | None) -> None:
    """Refuse now, where the user sees it, what the running daemon would refuse: a cancel of a job that is
    neither pending nor running, a retry of a job that cannot be queued again."""
    if action == "cancel":
        _job_in(spool, job_id, (JobStatus.PENDING, JobStatus.RUNNING), "cancel")
    elif action == "retry":
        check_retry(spool, job_id, config)


def apply(spool: Spool, action: str, job_id: int | None = None, *, config: CurrentConfig | None = None,
          status=None, current: dict | None = None, running: dict[int, dict] | None = None) -> str | None:
    """Carry out one request and say what was done, in words.

    The CLI calls it when no daemon runs (holding the daemon lock): it gets the words back, and a refusal (no
    such job, a job in the wrong state) raises UserError for the user to see. The daemon calls it for each
    request file with its StatusWriter as `status`: the words and any refusal go to the log (a refusal as a
    warning; the daemon goes on), and with `running` (job id -> its status dict), the jobs it is training: the
    cancel of one of them is only flagged there (["cancelled"]) for the daemon to stop that job's trainer, and
    no other. `current`: one such job's dict (as before several jobs could run at once). `config`: the current
    config a retried job takes (current_config()); None keeps its snapshot (`retry --same-config`).
    """
    if action not in _ACTIONS:
        return None  # a request file made by hand: nothing this daemon knows how to do
    training = dict(running or {})
    if current and current.get("job_id") is not None:
        training.setdefault(current["job_id"], current)
    if action == "cancel" and job_id in training:
        training[job_id]["cancelled"] = True
        return None
    event, handler = _ACTIONS[action]
    try:
        message = retry_job(spool, job_id, config) if action == "retry" else handler(spool, job_id)
    except UserError as e:
        if status is None:
            raise
        status.event(event, str(e), level="warning", job_id=job_id)
        return None
    if status is None:
        return _WITHOUT_DAEMON.get(action, message)
    status.event(event, message)
    return message


def event_name(action: str) -> str:
    """The event a request is logged as (status.log, events.jsonl)."""
    return _ACTIONS[action][0]


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


def check_retry(spool: Spool, job_id: int, config: CurrentConfig | None = None) -> tuple[Job, dict | None]:
    """The failed job `job_id` and the config it would take (None: it keeps its snapshot), if it can be queued
    again; else UserError saying why not (every error of an invalid config at once)."""
    job = _job_in(spool, job_id, JobStatus.FAILED, "retry")
    folder = spool.job_dir(job)
    if not (folder / INPUT).is_file() or (folder / INPUT).is_symlink():
        what = ("it was a symlink, which is never followed" if os.path.lexists(folder / SYMLINK_INPUT)
                else "it has no regular input file")
        raise UserError(f"retry: job {job_id} cannot be queued again: {what}; drop the real file into the inbox")
    if job.adapter == UNKNOWN:
        raise UserError(f"retry: job {job_id} cannot be queued again: its adapter is unknown (its job.json was "
                        f"lost); drop {folder / INPUT} into the inbox again")
    if config is None:
        return job, None
    try:
        return job, config(job.adapter)
    except UserError as e:
        raise UserError(f"retry: job {job_id} not queued again: the current config for adapter {job.adapter} is "
                        f"invalid (fix it, or keep the job's old config with --same-config): {e}") from None


def retry_job(spool: Spool, job_id: int, config: CurrentConfig | None = None) -> str:
    """Send a failed job back to the queue with the current config (None: its snapshot); its earlier attempts
    stay in its history, and the retry's entry there says what became of its config."""
    job, fresh = check_retry(spool, job_id, config)
    folder = spool.job_dir(job)
    mark = {"n": len(job.attempts) + 1, "outcome": OutcomeKind.RETRIED_BY_USER, "started_at": now_iso()}
    if fresh is None:
        mark["config"] = "kept" if (folder / SNAPSHOT).exists() else "taken at its start"
        said = ("with its config snapshot kept" if mark["config"] == "kept"
                else "(no config snapshot yet: it takes the config at its start)")
    else:
        changes = _refresh_snapshot(folder, fresh)
        mark.update(config="current", config_changes=changes)
        shown = "; ".join(changes[:SHOWN_CHANGES]) + (f"; {len(changes) - SHOWN_CHANGES} more (job.json)"
                                                        if len(changes) > SHOWN_CHANGES else "")
        said = f"with the current config ({shown})" if changes else "with the current config (unchanged)"
    job.attempts.append(mark)
    decision = policy.decide(Outcome(OutcomeKind.RETRIED_BY_USER), job.attempts)
    decision.apply_to(job, now_iso())
    job.note = f"retried {said}"
    spool.move(job, decision.state)
    return f"job {job_id} queued again {said}"


def _refresh_snapshot(folder: Path, fresh: dict) -> list[str]:
    """Write `fresh` as the job's config.json; the keys that differ from the old one, as "key: old -> new".

    A change to how the job trains (base model, training, LoRA) also drops the job's resume checkpoints: they
    hold a run of the old settings (another LoRA rank, other batches), which the new one must not continue. Any
    other change (a longer stall timeout, more attempts) keeps them: that is what a user raises to let a job
    that failed on them finish."""
    from daemon.config import OVERRIDABLE

    old = durable.read_json(folder / SNAPSHOT)
    differences = _differences(old, fresh) if isinstance(old, dict) else None
    changes = (["config.json: none before"] if differences is None
               else [f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in differences])
    if differences is None or any(key.split(".")[0] in OVERRIDABLE for key, _, _ in differences):
        shutil.rmtree(folder / "resume", ignore_errors=True)
    if changes:
        durable.write_json(folder / SNAPSHOT, fresh)
    return changes


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


_ABSENT = object()


def _show(value) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value)


# action: (the event the daemon logs it as, what it does: (spool, job_id) -> what was done, in words)
_ACTIONS = {
    "pause": ("paused", _pause),
    "resume": ("resumed", _resume),
    "cancel": ("cancel", cancel_job),
    "retry": ("retry", retry_job),
}
# The daemon's words speak of a running daemon; the CLI applies a request itself only when none runs.
_WITHOUT_DAEMON = {"pause": "paused (no daemon is running; it starts paused)"}


def _job_in(spool: Spool, job_id: int, state: JobStatus | tuple[JobStatus, ...], action: str) -> Job:
    states = state if isinstance(state, tuple) else (state,)
    found = spool.get(job_id)
    if found is None:
        raise UserError(f"{action}: no job {job_id}")
    job, _ = found
    if job.unreadable:
        raise UserError(f"{action}: job {job_id} cannot be changed now: {job.unreadable}; the daemon sets it aside "
                        "in queue/failed/ when it next starts or reaches it")
    if job.state not in states:
        raise UserError(f"{action}: job {job_id} is {job.state}, not {' or '.join(states)}")
    return job
