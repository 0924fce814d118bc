"""Pause, resume, cancel and retry through control.apply(): applied by the CLI (no daemon) or by the daemon."""

from __future__ import annotations

import json

import pytest

from daemon.config_errors import ConfigError, issue
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
    assert control.apply(spool, "retry", job_id) == (f"job {job_id} queued again (no config snapshot yet: it "
                                                     "takes the config at its start)")
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


def failed_job(spool: Spool, snapshot: dict | None) -> tuple[int, object]:
    job_id = queue(spool)
    control.apply(spool, "cancel", job_id)
    folder = spool.get(job_id)[1]
    if snapshot is not None:
        (folder / "config.json").write_text(json.dumps(snapshot))
        (folder / "resume" / "step-000002").mkdir(parents=True)
    return job_id, folder


OLD = {"base_model": "m", "training": {"max_length": 16, "epochs": 1}, "lora": {"r": 4}}


def test_retry_takes_the_current_config_and_says_what_changed(spool):
    job_id, folder = failed_job(spool, OLD)
    new = {"base_model": "m", "training": {"max_length": 128, "epochs": 1}, "lora": {"r": 4, "alpha": 8}}
    asked = []

    def current(adapter):
        asked.append(adapter)
        return new

    said = control.apply(spool, "retry", job_id, config=current)
    assert said == (f"job {job_id} queued again with the current config (lora.alpha: (unset) -> 8; "
                    "training.max_length: 16 -> 128)")
    assert asked == ["default"]
    job, folder = spool.get(job_id)
    assert json.loads((folder / "config.json").read_text()) == new
    assert not (folder / "resume").exists()  # checkpoints of the old settings are not continued
    assert job.attempts[-1]["config"] == "current" and job.note == "retried " + said.split("again ", 1)[1]
    assert job.attempts[-1]["config_changes"] == ["lora.alpha: (unset) -> 8", "training.max_length: 16 -> 128"]


def test_retry_with_an_unchanged_config_keeps_the_checkpoints(spool):
    job_id, folder = failed_job(spool, OLD)
    assert control.apply(spool, "retry", job_id, config=lambda _: OLD).endswith("with the current config (unchanged)")
    assert (spool.get(job_id)[1] / "resume" / "step-000002").is_dir()


def test_retry_same_config_keeps_the_snapshot(spool):
    job_id, folder = failed_job(spool, OLD)
    assert control.apply(spool, "retry", job_id) == f"job {job_id} queued again with its config snapshot kept"
    job, folder = spool.get(job_id)
    assert json.loads((folder / "config.json").read_text()) == OLD and job.attempts[-1]["config"] == "kept"


def test_retry_with_an_invalid_current_config_is_refused_with_every_error(spool):
    job_id, _ = failed_job(spool, OLD)

    def broken(_adapter):
        raise ConfigError([issue("training.max_length", "must be at least 16", 3),
                           issue("lora.r", "must be a positive integer", -1)], "config/daemon.yaml")

    with pytest.raises(UserError) as refused:
        control.apply(spool, "retry", job_id, config=broken)
    assert str(refused.value).startswith(f"retry: job {job_id} not queued again: the current config for adapter "
                                         "default is invalid (fix it, or keep the job's old config with "
                                         "--same-config): config config/daemon.yaml has 2 errors:")
    assert "training.max_length: must be at least 16 (got 3)" in str(refused.value) and "lora.r" in str(refused.value)
    assert spool.get(job_id)[0].state == JobStatus.FAILED
    log = Log()  # the daemon: one warning, the job stays failed
    control.apply(spool, "retry", job_id, config=broken, status=log)
    assert [(k, level) for k, _, level, _ in log.events] == [("retry", "warning")]


def test_a_request_carries_same_config(spool):
    control.request(spool.layout, "retry", 3, same_config=True)
    control.request(spool.layout, "retry", 4)
    assert [(r["job_id"], r["same_config"]) for r in control.take(spool.layout)] == [(3, True), (4, False)]


def test_a_job_whose_manifest_cannot_be_read_is_neither_cancelled_nor_retried(spool):
    job_id = queue(spool)
    (spool.get(job_id)[1] / "job.json").write_text("{")
    with pytest.raises(UserError, match=f"^cancel: job {job_id} cannot be changed now: job.json is not valid JSON"):
        control.apply(spool, "cancel", job_id)
    assert (spool.get(job_id)[1] / "job.json").read_text() == "{"


def no_config(_adapter):
    raise AssertionError("pause, resume and cancel never read the config")


def test_a_command_without_a_daemon_applies_what_a_stopped_daemon_left_first(spool):
    control.request(spool.layout, "pause")  # asked of a daemon that stopped before taking it
    said = control.command(spool.layout, "resume", current=no_config)
    assert said.splitlines() == ["first, an earlier pause request the daemon stopped before taking: paused: no new "
                                 "job starts; a running job checkpoints and waits", "resumed"]
    assert not control.is_paused(spool.layout) and not control.take(spool.layout)


def test_with_a_daemon_running_a_cancel_it_would_refuse_is_refused_at_once(spool):
    daemon = control.DaemonLock(spool.layout).acquire()
    try:
        with pytest.raises(UserError, match="^cancel: no job 999$"):
            control.command(spool.layout, "cancel", 999, current=no_config)
        job_id = queue(spool)
        assert control.command(spool.layout, "cancel", job_id, current=no_config) == (
            "cancel requested; the daemon applies it within a second")
        control.cancel_job(spool, job_id)
        with pytest.raises(UserError, match=f"^cancel: job {job_id} is failed, not pending or running$"):
            control.command(spool.layout, "cancel", job_id, current=no_config)
        assert [r["action"] for r in control.take(spool.layout)] == ["cancel"]  # only the one it could do
    finally:
        daemon.release()


def test_commands_take_turns_and_one_that_waits_too_long_says_so(spool):
    with control.turn(spool.layout):
        with pytest.raises(UserError, match="has not finished in 0s; try again$"):
            with control.turn(spool.layout, wait=0.2):
                pass
    with control.turn(spool.layout, wait=0.2):  # free again once the first is done
        pass
