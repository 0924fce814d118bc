"""What the daemon says after each attempt: one status.log line (and event) for the retry policy's verdict
(policy.py decides; this only tells)."""

from __future__ import annotations

from pathlib import Path

from daemon.supervisor.job import Job
from daemon.supervisor.outcome import Outcome
from daemon.supervisor.policy import Decision, Verdict
from daemon.supervisor.status import StatusWriter


def say(status: StatusWriter, job: Job, job_dir: Path, outcome: Outcome, decision: Decision, micro_batch: int,
        resume_point: str | None) -> None:
    """job: already changed by the decision. micro_batch: what the attempt ran with."""
    verdict, n, limit = decision.verdict, decision.counted, decision.limit
    if verdict == Verdict.DONE:
        held = outcome.decision == "held"
        stays = f" (held: latest stays {'v' + str(outcome.latest) if outcome.latest is not None else 'none'})"
        status.event("job_done", f"job {job.id} done: {job.adapter} v{outcome.version} at {outcome.path}"
                     + (stays if held else ""), job_id=job.id, version=outcome.version, path=outcome.path,
                     decision=outcome.decision, latest=outcome.latest)
    elif verdict == Verdict.PAUSED:
        status.event("job_paused", f"job {job.id} back to pending: {job.note}", job_id=job.id,
                     resume_point=resume_point)
    elif verdict == Verdict.BLOCKED:
        status.event("job_blocked", f"job {job.id} back to pending, the attempt not counted: "
                     f"{outcome.first_line}", level="warning", job_id=job.id)
    elif verdict == Verdict.WAIT_FOR_DISK:
        status.event("disk_full", f"job {job.id} paused, disk full (attempt {n} of {limit}): "
                     f"{outcome.error}; input and earlier versions are intact", level="error", job_id=job.id)
    elif verdict == Verdict.SMALLER_BATCH:
        status.event("oom_retry", f"job {job.id}: out of memory at micro-batch {micro_batch}; retrying with "
                     f"{job.micro_batch_size} and {micro_batch // job.micro_batch_size}x the accumulation "
                     "(same effective batch)", level="warning", job_id=job.id)
    elif verdict == Verdict.RETRY:
        status.event("job_retry", f"job {job.id} failed (attempt {n} of {limit}), will retry: "
                     f"{outcome.first_line}", level="warning", job_id=job.id)
    else:
        first_line = Outcome(outcome.kind, job.error).first_line
        status.event("job_failed", f"job {job.id} failed: {first_line} (details: {job_dir.name}/error.json)",
                     level="error", job_id=job.id, adapter=job.adapter, error=job.error)
