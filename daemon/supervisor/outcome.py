"""What a trainer's exit means for its attempt: an Outcome, from the exit status and the files it left
(result.json, error.json, checkpoints under resume/)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from daemon import durable, protocol
from daemon.durable import read_json
from daemon.protocol import ErrorKind
from daemon.timefmt import now_iso


class OutcomeKind(str, Enum):
    """The `outcome` of an attempt in job.json."""

    DONE = "done"
    STOPPED = "stopped"  # warm stop: checkpointed on request
    COLD_STOPPED = "cold_stopped"  # killed by a cold stop
    INTERRUPTED = "interrupted"  # the daemon died while it ran (found by the start-up sweep)
    DISK_FULL = "disk_full"
    UNAVAILABLE = "unavailable"  # something every job needs was missing (base model, GPUs, disk): not counted
    STALLED = "stalled"  # killed after limits.stall_timeout_seconds without an event from the trainer
    OUT_OF_MEMORY = "out_of_memory"
    BAD_INPUT = "bad_input"
    BAD_CONFIG = "bad_config"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRIED_BY_USER = "retried_by_user"  # not an attempt: the mark `retry` leaves in the job's history

    def __str__(self) -> str:
        return self.value


@dataclass
class Outcome:
    kind: OutcomeKind
    error: str | None = None
    version: int | None = None
    path: str | None = None
    # The promotion gate's verdict on a done attempt's version (result.json; an older trainer's: promoted).
    decision: str | None = None
    latest: int | None = None

    @property
    def first_line(self) -> str:
        return (self.error or "").strip().splitlines()[0] if self.error else str(self.kind)


TRAINER_LOG_TAIL_LINES = 15  # of trainer.log, in a stalled attempt's error: what the trainer was doing


def describe_exit(rc: int, job_dir: Path, *, stop_requested: bool, cancelled: bool,
                  stalled: str | None = None) -> Outcome:
    """stalled: the daemon killed the trainer for its silence; this says how long, and its last event."""
    if cancelled:
        return Outcome(OutcomeKind.CANCELLED, "cancelled by user")
    if rc == protocol.DONE:
        result = read_json(job_dir / "result.json", {})
        if "version" in result:
            held = result.get("decision") == "held"
            return Outcome(OutcomeKind.DONE, version=result["version"], path=result.get("path"),
                           decision="held" if held else "promoted",
                           latest=result.get("latest", None if held else result["version"]))
        return Outcome(OutcomeKind.FAILED, "trainer exited 0 without result.json")
    err = read_json(job_dir / "error.json", {})
    message = err.get("message") or ""
    if err.get("traceback") and err["traceback"].strip() != "NoneType: None":
        message = f"{message}\n{err['traceback']}".strip()
    if rc == protocol.STOPPED:
        return Outcome(OutcomeKind.STOPPED, "stopped on request after a checkpoint; it resumes from there")
    if rc < 0 and stalled:
        tail = trainer_log_tail(job_dir, TRAINER_LOG_TAIL_LINES)
        return Outcome(OutcomeKind.STALLED, f"stalled: {stalled}\n"
                       + (f"last lines of {job_dir.name}/trainer.log:\n{tail}" if tail else "trainer.log is empty"))
    if rc < 0 and stop_requested:
        return Outcome(OutcomeKind.COLD_STOPPED,
                       "the trainer was killed by a cold stop; it resumes from its last checkpoint")
    if rc == protocol.BAD_INPUT:
        return Outcome(OutcomeKind.BAD_INPUT, message or "invalid input")
    if rc == protocol.OUT_OF_MEMORY:
        return Outcome(OutcomeKind.OUT_OF_MEMORY, message or "out of memory")
    if rc == protocol.DISK_FULL:
        return Outcome(OutcomeKind.DISK_FULL, message or "disk full")
    if rc == protocol.UNAVAILABLE:
        return Outcome(OutcomeKind.UNAVAILABLE, message or "something every job needs is unavailable")
    if rc < 0:
        return Outcome(OutcomeKind.FAILED, f"the trainer was killed by signal {-rc}"
                       + (f"\n{message}" if message else "") + f"\n(see {job_dir.name}/trainer.log)")
    return Outcome(OutcomeKind.FAILED,
                   message or f"the trainer exited with status {rc} (see {job_dir.name}/trainer.log)")


def write_error(job_dir: Path, kind: ErrorKind, message: str) -> None:
    """error.json for an attempt that ended before a trainer could write one (the daemon's own refusal)."""
    durable.write_json(job_dir / "error.json", {"kind": kind.value, "message": message, "at": now_iso()})


def trainer_log_tail(job_dir: Path, lines: int) -> str:
    """The last lines of the job's trainer.log (read from its end: a log can be large)."""
    try:
        with open(job_dir / "trainer.log", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def resume_point(job_dir: Path) -> str | None:
    """The newest complete checkpoint of a job (checkpoint.py's rule, read without importing torch)."""
    resume = job_dir / "resume"
    names = [p.name for p in resume.glob("step-*") if (p / "COMPLETE").exists()] if resume.is_dir() else []
    return max(names, default=None)
