"""The one line that says what the daemon is doing now: systemd's STATUS= (what `systemctl status` shows).

A pure function of the daemon's state and the jobs in training (status.json's `daemon.state`, `current` and
`running`), so that every change of either - a job started, each phase, each progress line, a checkpoint,
publishing, idle again, paused, blocked, stalled, waiting for disk - is a new line, and nothing else is.
With one job in training the line tells all about it; with several, each gets a few words (the line is one
line of `systemctl status`), and `training-daemon status` has the rest.
"""

from __future__ import annotations

from daemon.supervisor.console import progress_line

# What a job is doing, by its phase (protocol.Event.PHASE, and the daemon's own "starting" and "stalled").
_PHASES = {"starting": "starting", "validating": "validating {file}", "loading": "loading the model",
           "saving": "saving a checkpoint before stopping", "publishing": "publishing the new version",
           "stalled": "stalled: killing its trainer", "waiting_for_gpu": "validated, waiting for the GPU"}
SHOWN_JOBS = 4  # with more running, the line names these and counts the rest


def _in_brief(job: dict) -> str:
    """A few words for one of several running jobs: "job 7 (a) step 40/100", "job 8 (b) loading"."""
    phase = job.get("phase") or "training"
    if job.get("saving_step") is not None and phase == "training":
        doing = f"saving step {job['saving_step']}"
    elif phase == "training":
        doing = f"step {job.get('step') or 0}/{job.get('total_steps') or '?'}"
    elif phase == "waiting_for_gpu":
        doing = "waiting for the GPU"  # prepared early, while the job before it trains
    else:
        doing = phase
    return f"job {job.get('job_id')} ({job.get('adapter')}) {doing}"


def status_line(state: str, current: dict | None, *, pending: int = 0, reason: str | None = None,
                inbox: str = "", running: list[dict] | None = None) -> str:
    """state: the daemon's (idle, training, paused, blocked, waiting_for_disk, ...). current: the job in
    training, if any (the oldest, when several are). running: every job in training, oldest first (None: just
    `current`). pending: jobs waiting. reason: why the daemon waits (blocked, waiting_for_disk)."""
    if running and len(running) > 1:
        named = ", ".join(_in_brief(job) for job in running[:SHOWN_JOBS])
        more = f", {len(running) - SHOWN_JOBS} more" if len(running) > SHOWN_JOBS else ""
        waiting = sum(1 for job in running if job.get("phase") == "waiting_for_gpu")
        if waiting:  # prepared early (standby.py): not on the GPU yet
            return f"training {len(running) - waiting}, {waiting} waiting for the GPU: {named}{more}"
        return f"training {len(running)} jobs: {named}{more}"
    current = current or (running[0] if running else None)
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
