"""The one line that says what the daemon is doing now: systemd's STATUS= (what `systemctl status` shows).

A pure function of the daemon's state and the current job (status.json's `daemon.state` and `current`), so
that every change of either - a job started, each phase, each progress line, a checkpoint, publishing, idle
again, paused, blocked, stalled, waiting for disk - is a new line, and nothing else is.
"""

from __future__ import annotations

from daemon.supervisor.console import progress_line

# What a job is doing, by its phase (protocol.Event.PHASE, and the daemon's own "starting" and "stalled").
_PHASES = {"starting": "starting", "validating": "validating {file}", "loading": "loading the model",
           "saving": "saving a checkpoint before stopping", "publishing": "publishing the new version",
           "stalled": "stalled: killing its trainer"}


def status_line(state: str, current: dict | None, *, pending: int = 0, reason: str | None = None,
                inbox: str = "") -> str:
    """state: the daemon's (idle, training, paused, blocked, waiting_for_disk, ...). current: the job in
    training, if any. pending: jobs waiting. reason: why the daemon waits (blocked, waiting_for_disk)."""
    if current:
        job = f"job {current.get('job_id')} ({current.get('adapter')})"
        phase = current.get("phase") or "training"
        if current.get("saving_step") is not None and phase == "training":
            return f"{job}: saving a checkpoint at step {current['saving_step']}"
        if phase == "training":
            return f"training {job}: {progress_line(current)}"
        return f"{job}: " + _PHASES.get(phase, phase).format(file=current.get("file", "its file"))
    waiting = f"{pending} job(s) pending" if pending else "nothing pending"
    if state == "paused":
        return f"paused by `training-daemon pause`: {waiting}; `training-daemon resume` goes on"
    if state == "blocked":
        return f"blocked, no job starts: {reason}; {waiting}; re-checked until it is fixed (or `resume`)"
    if state == "waiting_for_disk":
        return f"waiting for disk space: {reason}; {waiting}"
    if state == "waiting_for_trainer":
        return f"waiting for an earlier daemon's trainer to exit; {waiting}"
    if state == "idle":
        return f"idle: watching {inbox}"
    return state
