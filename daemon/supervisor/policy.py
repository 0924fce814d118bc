"""The retry policy: what an attempt's outcome means for its job. The one place that decides.

Pure: no files, no processes, no clock. The daemon after each attempt, the start-up sweep (an attempt the
daemon died during) and the user's `retry` all ask decide() and apply its Decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from daemon.config import LimitsConfig
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind

# Failures that count towards max_attempts; disk-full attempts count too, but separately (see decide).
_FAILURES = (OutcomeKind.FAILED, OutcomeKind.INTERRUPTED, OutcomeKind.STALLED)


class Verdict(str, Enum):
    """Why the job goes where it goes: what the caller reports."""

    DONE = "done"
    PAUSED = "paused"  # a warm or cold stop: the user's doing, not an attempt that failed
    WAIT_FOR_DISK = "wait_for_disk"
    BLOCKED = "blocked"  # not the job's fault (base model, GPUs, disk gone): the queue waits, the attempt is free
    SMALLER_BATCH = "smaller_batch"  # out of memory: half the micro-batch, twice the accumulation
    RETRY = "retry"
    REQUEUED = "requeued"  # the user's `retry` of a failed job
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    state: JobStatus
    verdict: Verdict
    changes: dict = field(default_factory=dict)  # job.json fields to set; the others keep their values
    counted: int = 0  # attempts counted against the limit that applied (for the caller's message)
    limit: int = 0

    def apply_to(self, job: Job, now: str) -> None:
        """Write the decision into the job (the caller then moves it to `state`)."""
        for name, value in self.changes.items():
            setattr(job, name, value)
        if self.state != JobStatus.PENDING:
            job.finished_at = now


def decide(outcome: Outcome, attempts: list[dict], limits: LimitsConfig | None = None,
           micro_batch_size: int = 1, resume_point: str | None = None) -> Decision:
    """The job's next state after `outcome`.

    attempts: the job's history, this attempt included. limits: the job's config (the defaults serve callers
    whose outcome reads none: the user's retry). micro_batch_size: what the attempt ran with.
    resume_point: the job's newest complete checkpoint, for a stopped job's note.
    """
    limits = limits or LimitsConfig()
    kind, error = outcome.kind, outcome.error
    if kind == OutcomeKind.DONE:
        return Decision(JobStatus.DONE, Verdict.DONE, {"version": outcome.version, "error": None})
    if kind == OutcomeKind.RETRIED_BY_USER:
        # A fresh start: the counts restart after this mark, and so does the micro-batch.
        return Decision(JobStatus.PENDING, Verdict.REQUEUED, {"error": None, "micro_batch_size": None})
    if kind in (OutcomeKind.STOPPED, OutcomeKind.COLD_STOPPED):
        where = f"resume point: {resume_point}" if resume_point else "no checkpoint yet: it starts over"
        return Decision(JobStatus.PENDING, Verdict.PAUSED, {"note": f"{error} ({where})"})
    counted = counted_attempts(attempts)
    if kind == OutcomeKind.UNAVAILABLE:
        # Every job would fail the same way: the daemon waits for the cause to go, and this attempt never counts
        # (it is in the history, but not among _FAILURES). The daemon's own checks keep a job from starting while
        # they see the cause; an attempt whose cause they could not confirm afterwards ("unconfirmed": the trainer
        # sees something they cannot) would be retried every few seconds forever, so max_attempts of those in a
        # row fail the job.
        streak = [a for a in _trailing(counted, OutcomeKind.UNAVAILABLE) if a.get("unconfirmed")]
        if not (counted and counted[-1].get("unconfirmed")) or len(streak) < limits.max_attempts:
            return Decision(JobStatus.PENDING, Verdict.BLOCKED, {"note": error})
        error = (f"unavailable at {len(streak)} attempts in a row, each time after the daemon's own checks "
                 f"(base model, GPUs, a writable root) had passed\n\n" + _history(streak))
        return _failed(error, len(streak), limits.max_attempts)
    if kind == OutcomeKind.DISK_FULL:
        # Counted: a disk that fills at every try must not loop forever.
        full = [a for a in counted if a.get("outcome") == OutcomeKind.DISK_FULL]
        if len(full) < limits.max_attempts:
            return Decision(JobStatus.PENDING, Verdict.WAIT_FOR_DISK, {"note": error}, len(full), limits.max_attempts)
        error = "disk full; input and earlier versions are intact\n\n" + _history(full)
        return _failed(error, len(full), limits.max_attempts)
    if kind == OutcomeKind.OUT_OF_MEMORY:
        sizes = [a.get("micro_batch_size") for a in counted if a.get("outcome") == OutcomeKind.OUT_OF_MEMORY]
        if len(sizes) <= limits.oom_retries and micro_batch_size > 1:
            halved = {"micro_batch_size": max(1, micro_batch_size // 2)}
            return Decision(JobStatus.PENDING, Verdict.SMALLER_BATCH, halved, len(sizes), limits.oom_retries)
        error = (f"out of memory with micro-batch sizes {', '.join(map(str, sizes))} "
                 f"(oom_retries={limits.oom_retries}): {error}")
        return _failed(error, len(sizes), limits.oom_retries)
    if kind in _FAILURES:
        failures = [a for a in counted if a.get("outcome") in _FAILURES]
        if len(failures) < limits.max_attempts:
            # An interrupted attempt's reason is the daemon's restart, not the job's error.
            change = "note" if kind == OutcomeKind.INTERRUPTED else "error"
            return Decision(JobStatus.PENDING, Verdict.RETRY, {change: error}, len(failures), limits.max_attempts)
        return _failed(_history(failures), len(failures), limits.max_attempts)
    return _failed(error)  # bad input, bad config, cancelled: retrying cannot help


def counted_attempts(attempts: list[dict]) -> list[dict]:
    """The attempts that count towards the limits: those after the user's last `retry`."""
    for i in range(len(attempts) - 1, -1, -1):
        if attempts[i].get("outcome") == OutcomeKind.RETRIED_BY_USER:
            return attempts[i + 1:]
    return attempts


def _trailing(attempts: list[dict], kind: OutcomeKind) -> list[dict]:
    """The attempts of `kind` at the end of the history, with no other outcome between them."""
    n = 0
    while n < len(attempts) and attempts[-1 - n].get("outcome") == kind:
        n += 1
    return attempts[len(attempts) - n:]


def _failed(error: str | None, counted: int = 0, limit: int = 0) -> Decision:
    return Decision(JobStatus.FAILED, Verdict.FAILED, {"error": error}, counted, limit)


def _history(attempts: list[dict]) -> str:
    return "\n\n".join(f"attempt {a.get('n')}: {a.get('error')}" for a in attempts)
