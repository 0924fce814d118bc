"""Graceful stop and one daemon per root: real signals to a real daemon while its trainer is mid-step.

The trainer is slowed down (a `sleep` fault on every micro-batch, which changes no number) so that a signal
lands while a step is in flight; every stopped job is then finished by a restart and must publish exactly
the adapter an uninterrupted run does.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

import resume_case
from accounting import Inbox, account, faults, resumes, stop, trainer_pids, wait_event
from helpers import chat_lines, cli, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow
# The regular checkpoint at step 2 succeeds; any later one (the warm stop's) never finishes.
STUCK_SAVING = {"point": "checkpoint_save", "kind": "hang", "min_step": 3}


def start_training(root, model_dir, *extra_faults, **sections):
    resume_case.configure(root, model_dir, **sections)
    inbox = Inbox(root)
    inbox.drop(resume_case.NAME, resume_case.LINES)
    daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=faults(resume_case.SLOW_STEPS, *extra_faults))
    wait_event(root, "checkpoint", step=2)
    return inbox, daemon


def finish_and_compare(root, inbox, expected, resumed_from: int, **env):
    """Restart (without faults, unless `env` sets some): the job resumes where it stopped and ends as if it
    never had."""
    r = cli(root, "run", "--once", **env)
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
    assert [e["step"] for e in resumes(root)] == [resumed_from]
    resume_case.assert_same_adapter(root, expected)


def test_first_signal_is_a_warm_stop(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    inbox, daemon = start_training(root, tiny_model_dir)

    began = time.monotonic()
    assert stop(daemon, signal.SIGTERM) == 0
    assert time.monotonic() - began < 10  # a checkpoint at the next step boundary, not the end of the job

    (job,) = jobs(root)
    stopped_at = events(root, "checkpoint")[-1]["step"]
    assert job["folder"] == "pending"
    assert job["note"] == ("stopped on request after a checkpoint; it resumes from there "
                           f"(resume point: step-{stopped_at:06d})")
    assert 2 <= stopped_at < resume_case.STEPS  # partly trained ...
    assert (root / "queue/pending/j000001/resume" / f"step-{stopped_at:06d}" / "COMPLETE").exists()
    assert not (root / "checkpoints" / "default" / "v1").exists()  # ... so neither done nor published
    assert not trainer_pids(root)
    assert [e["message"] for e in events(root, "signal")] == ["SIGTERM: warm stop: checkpointing the running jobs"]
    finish_and_compare(root, inbox, expected, resumed_from=stopped_at)


def test_second_signal_is_a_cold_stop_and_loses_nothing(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    inbox, daemon = start_training(root, tiny_model_dir, STUCK_SAVING, limits={"max_attempts": 2})
    (trainer,) = trainer_pids(root)

    daemon.send_signal(signal.SIGTERM)
    wait_event(root, "stopping")
    time.sleep(0.5)  # the trainer is now stuck in its warm-stop checkpoint
    assert stop(daemon, signal.SIGINT) == 0  # Ctrl-C counts as the second signal too
    assert trainer not in trainer_pids(root)  # its process group was killed
    assert [e["message"] for e in events(root, "signal")] == ["SIGTERM: warm stop: checkpointing the running jobs",
                                                              "SIGINT: cold stop: killing the trainers"]

    (job,) = jobs(root)
    assert job["folder"] == "pending" and job["attempts"][-1]["outcome"] == "cold_stopped"
    assert job["note"].endswith("it resumes from its last checkpoint (resume point: step-000002)")
    # A stop is the user's doing, not the job's failure: with max_attempts 2, one real failure after it
    # (before any step, so the resume point stays) is retried, not the end of the job.
    fail_once = {"point": "load", "kind": "error", "once_file": str(root / "failed-once")}
    finish_and_compare(root, inbox, expected, resumed_from=2, TRAINING_DAEMON_FAULTS=faults(fail_once))
    assert [a["outcome"] for a in jobs(root)[0]["attempts"]] == ["cold_stopped", "failed", "done"]


def test_a_once_run_stopped_before_the_queue_is_drained_exits_non_zero(root, tiny_model_dir):
    resume_case.configure(root, tiny_model_dir)
    Inbox(root).drop(resume_case.NAME, resume_case.LINES)
    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults(resume_case.SLOW_STEPS))
    wait_event(root, "checkpoint", step=2)
    assert stop(daemon, signal.SIGTERM) == 1  # a script running `run --once` must not take this for success
    assert [j["folder"] for j in jobs(root)] == ["pending"]


def test_a_trainer_that_does_not_stop_in_time_is_killed(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    inbox, daemon = start_training(root, tiny_model_dir, STUCK_SAVING, limits={"stop_timeout_seconds": 1})
    began = time.monotonic()
    assert stop(daemon, signal.SIGINT) == 0  # a first Ctrl-C is a warm stop, like SIGTERM
    assert time.monotonic() - began < 10
    assert events(root, "stopping")  # it asked the trainer to checkpoint first, then killed it
    assert "did not stop in 1.0s" in events(root, "stop_timeout")[0]["message"]
    assert [j["folder"] for j in jobs(root)] == ["pending"]
    finish_and_compare(root, inbox, expected, resumed_from=2)


def test_unreadable_newest_checkpoint_is_skipped_for_the_older_one(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    inbox, daemon = start_training(root, tiny_model_dir)
    wait_event(root, "checkpoint", step=4)
    assert stop(daemon) == 0
    older, newest = sorted((root / "queue/pending/j000001/resume").glob("step-*"))
    weights = newest / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle: only the manifest's sha256 can tell
    weights.write_bytes(bytes(data))

    finish_and_compare(root, inbox, expected, resumed_from=int(older.name.removeprefix("step-")))
    skipped = [e["message"] for e in events(root, "log") if "skipping checkpoint" in e["message"]]
    assert skipped == [f"job 1: skipping checkpoint {newest.name}: adapter.safetensors does not match its sha256"]


def test_pause_checkpoints_the_job_and_resume_finishes_it(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    inbox, daemon = start_training(root, tiny_model_dir)

    assert cli(root, "pause").returncode == 0
    wait_event(root, "job_paused")
    assert [j["folder"] for j in jobs(root)] == ["pending"] and not trainer_pids(root)
    wait_for(lambda: json.loads((root / "status.json").read_text())["daemon"]["state"] == "paused", what="paused")
    assert daemon.poll() is None  # paused, still running
    assert cli(root, "resume").returncode == 0
    wait_event(root, "job_done")
    assert stop(daemon) == 0

    account(root, inbox)
    assert len(resumes(root)) == 1
    resume_case.assert_same_adapter(root, expected)


def test_run_once_on_a_paused_root_ends_instead_of_waiting_for_resume(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    assert cli(root, "pause").returncode == 0  # no daemon running: it will start paused

    r = cli(root, "run", "--once", timeout=30)
    assert r.returncode == 1  # not everything was trained
    assert "run --once ends here" in events(root, "paused")[-1]["message"]
    assert not events(root, "job_started")

    assert cli(root, "resume").returncode == 0
    assert cli(root, "run", "--once").returncode == 0
    account(root, inbox)


def test_a_second_daemon_on_the_same_root_is_refused(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    daemon = start_daemon(root)
    wait_event(root, "job_done")

    r = cli(root, "run", "--once", timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: another training-daemon (pid {daemon.pid}) is already running on {root}"
    status = json.loads((root / "status.json").read_text())
    assert status["daemon"]["pid"] == daemon.pid and status["daemon"]["started_at"]
    assert status["queue"] == {"pending": 0, "running": 0, "done": 1, "failed": 0}

    daemon.kill()  # the lock dies with its process: a new daemon starts at once, no stale lock to clean up
    daemon.wait()
    r = cli(root, "run", "--once", timeout=30)
    assert r.returncode == 0, r.stderr
    account(root, inbox)


def test_sigusr2_writes_every_threads_stack_and_the_daemon_carries_on(root, tiny_model_dir):
    """For a daemon that seems stuck (docs/operations.md): its stacks on stderr, nothing else changes."""
    write_config(root, tiny_model_dir)
    daemon = start_daemon(root)
    wait_for(lambda: events(root, "daemon_started"), timeout=60, what="daemon_started")
    daemon.send_signal(signal.SIGUSR2)
    # Every thread's stack, the one that took the signal marked "Current thread", the loop's among them.
    wait_for(lambda: all(part in (root / "daemon.out").read_text(errors="replace")
                         for part in ("Current thread", "(most recent call first)", "daemon/supervisor/loop.py")),
             timeout=10, what="the threads' stacks on stderr")
    time.sleep(0.5)
    assert daemon.poll() is None and not events(root, "signal")
    assert stop(daemon) == 0
