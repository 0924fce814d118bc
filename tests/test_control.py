"""Pause, resume, cancel and retry through control.apply(): applied by the CLI (no daemon) or by the daemon."""

from __future__ import annotations

import pytest

from daemon.paths import Layout, UserError
from daemon.supervisor import control
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import Spool


class Log:
    """What the daemon's StatusWriter would be told."""

    def __init__(self):
        self.events = []

    def event(self, kind, message, level="info", **fields):
        self.events.append((kind, message, level, fields))


@pytest.fixture
def spool(root):
    return Spool(Layout.at(root).ensure())


def queue(spool: Spool, name: str = "a.jsonl") -> int:
    path = spool.layout.inbox / name
    path.write_bytes(b'{"text": "hi"}\n')
    return spool.claim(path, "default", name).id


def test_the_cli_gets_what_was_done_in_words(spool):
    assert control.apply(spool, "pause") == "paused (no daemon is running; it starts paused)"
    assert control.is_paused(spool.layout)
    assert control.apply(spool, "resume") == "resumed"
    assert not control.is_paused(spool.layout)
    job_id = queue(spool)
    assert control.apply(spool, "cancel", job_id) == f"job {job_id} cancelled"
    job, _ = spool.get(job_id)
    assert job.state == JobStatus.FAILED and job.error == "cancelled by user"
    assert job.finished_at  # ended like a cancelled running job: the same policy decided it
    assert control.apply(spool, "retry", job_id) == f"job {job_id} queued again"
    job, _ = spool.get(job_id)
    assert job.state == JobStatus.PENDING and job.error is None
    assert [a["outcome"] for a in job.attempts] == ["retried_by_user"]


def test_the_cli_sees_a_refusal_as_an_error(spool):
    with pytest.raises(UserError, match="^cancel: no job 9$"):
        control.apply(spool, "cancel", 9)
    job_id = queue(spool)
    with pytest.raises(UserError, match=f"^retry: job {job_id} is pending, not failed$"):
        control.apply(spool, "retry", job_id)


def test_the_daemon_logs_what_was_done_and_goes_on_after_a_refusal(spool):
    log = Log()
    job_id = queue(spool)
    control.apply(spool, "pause", status=log)
    control.apply(spool, "retry", job_id, status=log)
    control.apply(spool, "cancel", job_id, status=log)
    control.apply(spool, "resume", status=log)
    assert log.events == [
        ("paused", "paused: no new job starts; a running job checkpoints and waits", "info", {}),
        ("retry", f"retry: job {job_id} is pending, not failed", "warning", {"job_id": job_id}),
        ("cancel", f"job {job_id} cancelled", "info", {}),
        ("resumed", "resumed", "info", {}),
    ]
    assert not control.is_paused(spool.layout)


def test_cancelling_the_job_in_training_only_flags_it_for_the_daemon(spool):
    log = Log()
    job_id = queue(spool)
    current = {"job_id": job_id, "phase": "training"}
    assert control.apply(spool, "cancel", job_id, status=log, current=current) is None
    assert current["cancelled"] is True and log.events == []
    assert spool.get(job_id)[0].state == JobStatus.PENDING  # the daemon stops the trainer, then records it


def test_a_request_file_with_an_unknown_action_is_ignored(spool):
    log = Log()
    assert control.apply(spool, "reboot", status=log) is None
    assert control.apply(spool, None, status=log) is None
    assert log.events == []
