"""What crosses between the two processes: the trainer's exit codes, its events on stdout, the error kinds in
error.json and the exceptions that map to them. Both sides import this module; nothing here imports torch,
and nothing on either side recognises an outcome by a class name or a literal repeated elsewhere.
"""

from __future__ import annotations

import errno
from enum import Enum


# -- exit codes: the one thing a trainer always leaves, even when it could write nothing else
DONE = 0
FAILED = 1  # an unexpected error: retried up to limits.max_attempts
BAD_INPUT = 3  # invalid data or divergence: retrying cannot help
OUT_OF_MEMORY = 4  # retried with half the micro-batch and twice the accumulation
DISK_FULL = 5  # the job goes back to pending and the daemon waits for space
UNAVAILABLE = 6  # something every job needs is missing (base model, GPUs, a writable disk): the queue waits
DAEMON_GONE = 70  # the lifeline pipe closed: the daemon died, so the trainer exits unsupervised work
STOPPED = 75  # warm stop: checkpointed, back to pending (EX_TEMPFAIL)

NAMES = {DONE: "done", FAILED: "failed", BAD_INPUT: "bad input", OUT_OF_MEMORY: "out of memory",
         DISK_FULL: "disk full", UNAVAILABLE: "unavailable", STOPPED: "stopped", DAEMON_GONE: "daemon gone"}


class Event(str, Enum):
    """The `event` field of each JSON line a trainer writes on stdout (rank 0 only)."""

    STANDBY = "standby"  # an early trainer has imported the stack and waits for its job on stdin
    PHASE = "phase"  # validating | loading | training (with total_steps) | saving (a stop's checkpoint) | judging
    #                  (the new version and `latest` measured, daemon/trainer/judge.py) | publishing
    VALIDATED = "validated"
    INVALID = "invalid"
    RESUMED = "resumed"
    FIRST_STEP = "first_step"
    PROGRESS = "progress"
    EVAL = "eval"
    SAVING = "saving"
    CHECKPOINT = "checkpoint"
    PUBLISHED = "published"
    LOG = "log"  # a line for status.log, "level" optional (also what the daemon makes of a trainer's non-JSON stdout)

    def __str__(self) -> str:
        return self.value


class ErrorKind(str, Enum):
    """The `kind` field of error.json: why an attempt ended."""

    ERROR = "error"  # anything unexpected (a bug, a library's failure): the traceback says more
    BAD_INPUT = "bad_input"
    BAD_CONFIG = "bad_config"
    OUT_OF_MEMORY = "out_of_memory"
    DISK_FULL = "disk_full"
    DIVERGED = "diverged"
    NO_STEPS = "no_steps"  # the run completed no optimizer step (every one non-finite): nothing to publish
    UNAVAILABLE = "unavailable"  # not about the job: the base model or the disk it needs is gone (see Unavailable)

    def __str__(self) -> str:
        return self.value


class DiskFull(Exception):
    """Too little free space to write a checkpoint or a version safely (the free-space floor)."""


class Unavailable(Exception):
    """Something every job needs is missing or unusable (the base model, a writable disk): no job can succeed until
    it is back, so the daemon waits for it instead of failing job after job."""


def unavailable_reason(e: BaseException) -> str | None:
    """Why `e` is about the machine rather than the job (Unavailable, a read-only filesystem), or None."""
    if isinstance(e, Unavailable):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return f"the disk is read-only: {e}"
    return None


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC from anywhere (a library's save, report.json, a checkpoint) or the free-space floor."""
    return isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)


def log_name(rank: int) -> str:
    """Where a rank's stderr goes in its job folder, whoever started it (the daemon's launcher, srun)."""
    return "trainer.log" if rank == 0 else f"trainer-rank{rank}.log"
