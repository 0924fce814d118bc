"""The retry policy, case by case: an attempt's outcome and the job's history in, the job's next state out."""

from __future__ import annotations

import json

import pytest

from daemon.config import LimitsConfig
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind
from daemon.supervisor.policy import Verdict, counted_attempts, decide

K = OutcomeKind
LIMITS = LimitsConfig(max_attempts=3, oom_retries=2)


def history(*outcomes, micro_batches=None) -> list[dict]:
    """Attempts as job.json holds them, the last one being the attempt just ended."""
    sizes = micro_batches or [8] * len(outcomes)
    return [{"n": i + 1, "outcome": kind, "error": f"error {i + 1}", "micro_batch_size": size}
            for i, (kind, size) in enumerate(zip(outcomes, sizes))]


def unconfirmed(attempts: list[dict]) -> list[dict]:
    """Mark the unavailable attempts as the daemon records them when its own checks did not see the cause."""
    return [a | {"unconfirmed": True} if a["outcome"] == K.UNAVAILABLE else a for a in attempts]


CASES = [
    # (what, outcome, attempts, micro-batch, state, verdict, changes, counted)
    ("published", Outcome(K.DONE, version=2, path="/ckpt/v2"), history(K.DONE), 8,
     JobStatus.DONE, Verdict.DONE, {"version": 2, "error": None}, 0),
    ("a failure with attempts left", Outcome(K.FAILED, "boom"), history(K.FAILED), 8,
     JobStatus.PENDING, Verdict.RETRY, {"error": "boom"}, 1),
    ("interrupted by a daemon restart", Outcome(K.INTERRUPTED, "restart"), history(K.FAILED, K.INTERRUPTED), 8,
     JobStatus.PENDING, Verdict.RETRY, {"note": "restart"}, 2),
    ("failed and interrupted count together", Outcome(K.FAILED, "boom"),
     history(K.FAILED, K.INTERRUPTED, K.FAILED), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "attempt 1: error 1\n\nattempt 2: error 2\n\nattempt 3: error 3"}, 3),
    ("a user's retry restarts the count", Outcome(K.FAILED, "boom"),
     history(K.FAILED, K.FAILED, K.FAILED, K.RETRIED_BY_USER, K.FAILED), 8,
     JobStatus.PENDING, Verdict.RETRY, {"error": "boom"}, 1),
    ("warm stop: not an attempt that failed", Outcome(K.STOPPED, "stopped on request"),
     history(K.FAILED, K.FAILED, K.STOPPED), 8,
     JobStatus.PENDING, Verdict.PAUSED, {"note": "stopped on request (no checkpoint yet: it starts over)"}, 0),
    ("cold stop", Outcome(K.COLD_STOPPED, "killed"), history(K.COLD_STOPPED), 8,
     JobStatus.PENDING, Verdict.PAUSED, {"note": "killed (no checkpoint yet: it starts over)"}, 0),
    ("disk full: waits for space", Outcome(K.DISK_FULL, "ENOSPC"), history(K.FAILED, K.DISK_FULL), 8,
     JobStatus.PENDING, Verdict.WAIT_FOR_DISK, {"note": "ENOSPC"}, 1),
    ("disk full at every try", Outcome(K.DISK_FULL, "ENOSPC"), history(K.DISK_FULL, K.DISK_FULL, K.DISK_FULL), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "disk full; input and earlier versions are intact\n\n"
                                                 "attempt 1: error 1\n\nattempt 2: error 2\n\nattempt 3: error 3"}, 3),
    ("out of memory: half the micro-batch", Outcome(K.OUT_OF_MEMORY, "OOM"), history(K.OUT_OF_MEMORY), 8,
     JobStatus.PENDING, Verdict.SMALLER_BATCH, {"micro_batch_size": 4}, 1),
    ("odd micro-batch rounds down", Outcome(K.OUT_OF_MEMORY, "OOM"), history(K.OUT_OF_MEMORY, micro_batches=[3]), 3,
     JobStatus.PENDING, Verdict.SMALLER_BATCH, {"micro_batch_size": 1}, 1),
    ("out of memory at micro-batch 1: nothing left to halve", Outcome(K.OUT_OF_MEMORY, "OOM"),
     history(K.OUT_OF_MEMORY, micro_batches=[1]), 1,
     JobStatus.FAILED, Verdict.FAILED, {"error": "out of memory with micro-batch sizes 1 (oom_retries=2): OOM"}, 1),
    ("oom_retries used up", Outcome(K.OUT_OF_MEMORY, "OOM"),
     history(K.OUT_OF_MEMORY, K.OUT_OF_MEMORY, K.OUT_OF_MEMORY, micro_batches=[8, 4, 2]), 2,
     JobStatus.FAILED, Verdict.FAILED,
     {"error": "out of memory with micro-batch sizes 8, 4, 2 (oom_retries=2): OOM"}, 3),
    ("a user's retry restarts the out-of-memory count too", Outcome(K.OUT_OF_MEMORY, "OOM"),
     history(K.OUT_OF_MEMORY, K.OUT_OF_MEMORY, K.OUT_OF_MEMORY, K.RETRIED_BY_USER, K.OUT_OF_MEMORY,
             micro_batches=[8, 4, 2, None, 8]), 8,
     JobStatus.PENDING, Verdict.SMALLER_BATCH, {"micro_batch_size": 4}, 1),
    ("out-of-memory attempts do not use up max_attempts", Outcome(K.FAILED, "boom"),
     history(K.OUT_OF_MEMORY, K.OUT_OF_MEMORY, K.FAILED), 2,
     JobStatus.PENDING, Verdict.RETRY, {"error": "boom"}, 1),
    ("bad input: retrying cannot help", Outcome(K.BAD_INPUT, "line 3: not JSON"), history(K.BAD_INPUT), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "line 3: not JSON"}, 0),
    ("bad config", Outcome(K.BAD_CONFIG, "no such adapter override"), history(K.BAD_CONFIG), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "no such adapter override"}, 0),
    ("cancelled", Outcome(K.CANCELLED, "cancelled by user"), history(K.CANCELLED), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "cancelled by user"}, 0),
    ("the user's retry of a failed job", Outcome(K.RETRIED_BY_USER), history(K.OUT_OF_MEMORY, K.RETRIED_BY_USER), 1,
     JobStatus.PENDING, Verdict.REQUEUED, {"error": None, "micro_batch_size": None}, 0),
    ("stalled: a failed attempt, retried", Outcome(K.STALLED, "stalled: no event"), history(K.FAILED, K.STALLED), 8,
     JobStatus.PENDING, Verdict.RETRY, {"error": "stalled: no event"}, 2),
    ("stalled every time", Outcome(K.STALLED, "stalled"), history(K.STALLED, K.INTERRUPTED, K.STALLED), 8,
     JobStatus.FAILED, Verdict.FAILED, {"error": "attempt 1: error 1\n\nattempt 2: error 2\n\nattempt 3: error 3"}, 3),
    ("confirmed by the daemon's checks: never bounded", Outcome(K.UNAVAILABLE, "base model unavailable"),
     history(K.UNAVAILABLE, K.UNAVAILABLE, K.UNAVAILABLE, K.UNAVAILABLE), 8,
     JobStatus.PENDING, Verdict.BLOCKED, {"note": "base model unavailable"}, 0),
    ("unavailable: the queue waits, the attempt is free", Outcome(K.UNAVAILABLE, "base model unavailable"),
     history(K.FAILED, K.FAILED, K.UNAVAILABLE), 8,
     JobStatus.PENDING, Verdict.BLOCKED, {"note": "base model unavailable"}, 0),
    ("unavailable attempts never use up max_attempts", Outcome(K.FAILED, "boom"),
     history(K.UNAVAILABLE, K.UNAVAILABLE, K.UNAVAILABLE, K.FAILED), 8,
     JobStatus.PENDING, Verdict.RETRY, {"error": "boom"}, 1),
    ("unavailable again and again while the daemon's checks pass: failed, bounded",
     Outcome(K.UNAVAILABLE, "read-only"),
     unconfirmed(history(K.FAILED, K.UNAVAILABLE, K.UNAVAILABLE, K.UNAVAILABLE)), 8,
     JobStatus.FAILED, Verdict.FAILED,
     {"error": "unavailable at 3 attempts in a row, each time after the daemon's own checks (base model, GPUs, "
               "a writable root) had passed\n\nattempt 2: error 2\n\nattempt 3: error 3\n\nattempt 4: error 4"}, 3),
]


@pytest.mark.parametrize("what, outcome, attempts, micro_batch, state, verdict, changes, counted", CASES,
                         ids=[c[0] for c in CASES])
def test_decide(what, outcome, attempts, micro_batch, state, verdict, changes, counted):
    decision = decide(outcome, attempts, LIMITS, micro_batch)
    assert (decision.state, decision.verdict, decision.changes, decision.counted) == (state, verdict, changes, counted)


def test_a_stopped_job_is_told_where_it_resumes():
    decision = decide(Outcome(K.STOPPED, "stopped"), history(K.STOPPED), LIMITS, 8, resume_point="step-00000040")
    assert decision.changes == {"note": "stopped (resume point: step-00000040)"}


def test_the_limits_come_from_the_config():
    one = LimitsConfig(max_attempts=1, oom_retries=0)
    assert decide(Outcome(K.FAILED, "boom"), history(K.FAILED), one).state == JobStatus.FAILED
    assert decide(Outcome(K.OUT_OF_MEMORY, "OOM"), history(K.OUT_OF_MEMORY), one, 8).state == JobStatus.FAILED
    assert decide(Outcome(K.DISK_FULL, "ENOSPC"), history(K.DISK_FULL), one).state == JobStatus.FAILED


def test_applying_a_decision_touches_only_its_fields_and_ends_a_finished_job():
    job = Job(id=1, adapter="default", original_name="a.jsonl", error="old", note="kept", micro_batch_size=8)
    decide(Outcome(K.OUT_OF_MEMORY, "OOM"), history(K.OUT_OF_MEMORY), LIMITS, 8).apply_to(job, "t1")
    assert (job.micro_batch_size, job.error, job.note, job.finished_at) == (4, "old", "kept", None)
    decide(Outcome(K.BAD_INPUT, "bad"), history(K.BAD_INPUT), LIMITS, 4).apply_to(job, "t2")
    assert (job.error, job.note, job.finished_at) == ("bad", "kept", "t2")


def test_only_attempts_after_the_last_user_retry_count():
    attempts = history(K.FAILED, K.RETRIED_BY_USER, K.FAILED, K.RETRIED_BY_USER, K.INTERRUPTED)
    assert [a["n"] for a in counted_attempts(attempts)] == [5]
    assert counted_attempts(history(K.FAILED, K.FAILED)) == history(K.FAILED, K.FAILED)


def test_outcomes_are_written_to_job_json_as_plain_words():
    assert json.loads(json.dumps(history(K.INTERRUPTED)))[0]["outcome"] == "interrupted"
