"""How a Slurm attempt ended, as one protocol exit code (launch.job_exit_code semantics), from its ranks' exit
files and, where no rank could write one, Slurm's own end state. Kept apart from slurm_handle.py, which watches
the job while it runs. No torch here."""

from __future__ import annotations

from daemon import protocol
from daemon.protocol import ErrorKind
from daemon.supervisor import launch, slurm_commands
from daemon.supervisor.outcome import resume_point, write_error


def exit_status(h) -> int:
    """`h`: the SlurmTrainer. A rank without a status was killed: collateral when the daemon killed the job, or
    when another rank reported a warm stop (srun ends the rest of the step once one task exits 75). An end no
    rank could report (node failure, a time limit before a checkpoint, a cancel from outside) fails the
    attempt, error.json naming Slurm's state."""
    if h._refused is not None:
        return protocol.UNAVAILABLE
    statuses = slurm_commands.rank_statuses(h.job_dir)
    if h._cancelled_queued and not statuses:
        return protocol.STOPPED  # withdrawn while Slurm still queued it: nothing ran, nothing lost
    codes = [statuses[r]["code"] if r in statuses else -9 for r in range(max(h.tasks, 1))]
    missing = {r for r in range(len(codes)) if r not in statuses}
    state = h.slurm_state + (f" ({h.reason})" if h.reason else "")
    if h._killed:
        # A run that published before the kill reached it exits 0: DONE wins over a stall's or an overdue stop's
        # kill; a user's cancel still ends the job as cancelled, as for a local trainer (outcome.describe_exit),
        # and the version stays published.
        return launch.job_exit_code(codes, missing)
    if not statuses:
        _say(h, f"{h.who()} ended {state} before its trainer could report how "
                f"(see {h.job_dir.name}/slurm-{h.slurm_id}.out and trainer.log)")
        return protocol.FAILED
    stopped = any(s["code"] == protocol.STOPPED for s in statuses.values())
    code = launch.job_exit_code(codes, missing if stopped else set())
    if code == protocol.STOPPED and h._stop_asked_at is None:
        if h.slurm_state == "CANCELLED":
            # Its ranks checkpointed on Slurm's SIGTERM: someone cancelled the job outside the daemon. A failed
            # attempt (counted, retried from that checkpoint), not a pause nobody asked for.
            _say(h, f"{h.who()} was cancelled outside the daemon (state {state}); its trainer checkpointed first")
            return protocol.FAILED
        began = h.record.get("slurm_resume_from", "unset")
        if began != "unset" and resume_point(h.job_dir) == began:
            # A time limit (or a preemption) that comes before the trainer can checkpoint anything new would
            # resubmit the job forever: such a stop counts as a failed attempt.
            _say(h, f"{h.who()} was stopped by Slurm (state {state}: its time limit or a preemption) before "
                    f"a checkpoint newer than {began or 'none'}: no progress in this attempt (is slurm.time_limit "
                    "long enough to load the model and train a checkpoint's worth of steps?)")
            return protocol.FAILED
    if code not in (protocol.DONE, protocol.STOPPED) and missing and not (h.job_dir / "error.json").exists():
        _say(h, f"{h.who()} ended {state}; rank {', '.join(map(str, sorted(missing)))} left no status (killed)")
    return code


def _say(h, message: str) -> None:
    write_error(h.job_dir, ErrorKind.ERROR, message)
