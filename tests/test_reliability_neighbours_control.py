"""Hostile neighbours (issue 13), the control rows: racing control commands, refusals with a daemon running,
a pause a moment after a job started, and a trainer that cannot be executed. Real processes throughout: the
CLI as a user runs it, the daemon as systemd runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from daemon import protocol
from daemon.supervisor import launch
from daemon.supervisor.trainer_process import TrainerProcess
from accounting import Inbox, account, faults, stop, wait_event, wait_ready
from helpers import ENTRY, chat_lines, cli, env, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow
RACERS = 10
HELD_SECONDS = 15  # a trainer held before its stop handler is set: long enough for a CLI on a loaded machine


def queue_without_training(root: Path, job_id: int) -> None:
    """A pending job and no daemon: a paused daemon claims the inbox and trains nothing."""
    assert cli(root, "pause").returncode == 0
    daemon = start_daemon(root)
    try:
        wait_ready(root, daemon)
        wait_event(root, "job_queued", job_id=job_id, timeout=60)
    finally:
        assert stop(daemon) == 0
    assert cli(root, "resume").returncode == 0


def race(root: Path, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (no daemon waits for them) and collect how each ended."""
    procs = [subprocess.Popen([sys.executable, str(ENTRY), *args, "--root", str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=root) for args in commands]
    out = []
    for args, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def control_requests(root: Path) -> list[str]:
    folder = root / "state" / "control"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def pause_lines(root: Path) -> list[str]:
    """The status.log lines of pause and resume, in the order they were applied."""
    return [line for line in (root / "status.log").read_text().splitlines()
            if " paused" in line or " resumed" in line]


def test_racing_control_commands_without_a_daemon_apply_in_turn(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("a.jsonl", chat_lines(8))
    queue_without_training(root, 1)

    cancels = race(root, [["cancel", "1"]] * RACERS)
    won = [r for r in cancels if r.returncode == 0]
    assert [r.stdout for r in won] == ["job 1 cancelled\n"]
    for r in cancels:
        assert "requested" not in r.stdout
        if r.returncode:  # every loser was refused in one line: the job is already cancelled
            assert (r.returncode, r.stdout, r.stderr) == (1, "", "Error: cancel: job 1 is failed, not pending\n")

    mixed = race(root, [["pause"] if i % 2 == 0 else ["resume"] for i in range(RACERS)])
    assert [r.returncode for r in mixed] == [0] * RACERS, [r.stderr for r in mixed]
    assert not any("requested" in r.stdout for r in mixed)  # none thought another command was a daemon
    assert not control_requests(root)  # nothing left to be replayed at the next start
    applied = pause_lines(root)[-RACERS:]
    assert len(applied) == RACERS
    last_was_pause = " resumed" not in applied[-1]
    assert (root / "state" / "paused").exists() == last_was_pause  # the state is the last applied command's
    account(root, inbox, expect={"a.jsonl": "failed"}, reasons={"a.jsonl": "cancelled"})


def test_a_request_a_stopped_daemon_left_comes_before_a_later_command(root, tiny_model_dir):
    """The issue's failure: `pause` asked of a daemon that died before taking it, then `resume` with no daemon;
    the next daemon came up paused. The left request is applied first, so `resume` has the last word."""
    write_config(root, tiny_model_dir)
    daemon = start_daemon(root)
    wait_ready(root, daemon)
    daemon.send_signal(signal.SIGSTOP)  # alive, holding its lock, taking no request
    try:
        r = cli(root, "pause")
        assert (r.returncode, r.stdout) == (0, "pause requested; the daemon applies it within a second\n")
    finally:
        daemon.kill()
        daemon.wait(timeout=60)
    assert len(control_requests(root)) == 1

    r = cli(root, "resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "first, an earlier pause request the daemon stopped before taking: "
        "paused: no new job starts; a running job checkpoints and waits",
        "resumed"]
    assert not control_requests(root) and not (root / "state" / "paused").exists()

    inbox = Inbox(root)
    inbox.drop("b.jsonl", chat_lines(8))
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr  # not paused: it trained the file
    account(root, inbox, expect={"b.jsonl": "done"})


def test_cancel_or_retry_of_an_unknown_or_finished_job_is_refused_at_once_with_a_daemon_running(root,
                                                                                                 tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("a.jsonl", chat_lines(8))
    queue_without_training(root, 1)
    assert cli(root, "cancel", "1").returncode == 0  # job 1 is now failed: finished
    daemon = start_daemon(root)
    try:
        wait_ready(root, daemon)
        for args, error in [(("cancel", "999"), "cancel: no job 999"),
                            (("cancel", "1"), "cancel: job 1 is failed, not pending or running"),
                            (("retry", "999"), "retry: no job 999")]:
            r = cli(root, *args)
            assert (r.returncode, r.stdout, r.stderr) == (1, "", f"Error: {error}\n")
        assert not control_requests(root)  # refused here, not handed to the daemon to refuse in status.log
        r = cli(root, "retry", "1", "--same-config")  # one it can do is still a request for the daemon
        assert (r.returncode, r.stdout) == (0, "retry requested; the daemon applies it within a second\n")
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done"], timeout=300, what="job 1 retried and done")
    finally:
        assert stop(daemon) == 0
    account(root, inbox, expect={"a.jsonl": "done"})


def test_a_warm_stop_asked_before_the_trainer_said_anything_waits_for_its_first_event(tmp_path):
    """A trainer that sets its SIGUSR1 handler late (after 1.5 s of "imports") and only then speaks: a stop
    asked at once is sent with its first event, so it stops warm (75) instead of dying of SIGUSR1."""
    late = [sys.executable, "-c", "import signal, sys, time\ntime.sleep(1.5)\n"
            "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
            "print('{\"event\": \"phase\", \"phase\": \"validating\"}', flush=True)\ntime.sleep(60)"]
    _, lifeline = os.pipe()
    trainer = TrainerProcess(launch.start(late, launch.Grant(1, None), dict(os.environ), tmp_path, pass_fds=(),
                                          cwd=tmp_path), lifeline)
    try:
        assert trainer.warm_stop() and not trainer.warm_stop()  # asked once
        wait_for(lambda: trainer.poll_events(0.2) is not None and trainer.done, timeout=30, what="the trainer")
        assert trainer.exit_status() == protocol.STOPPED
    finally:
        trainer.cold_stop()
        trainer.close()


def test_a_pause_a_moment_after_a_job_started_is_a_warm_stop(root, tiny_model_dir):
    """The trainer is held before its stop handler is set (a `sleep` fault at `trainer_start`); a pause then
    must wait for the handler, not kill the trainer by SIGUSR1's default action."""
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("a.jsonl", chat_lines(8))
    held = {"point": "trainer_start", "kind": "sleep", "seconds": HELD_SECONDS, "once_file": str(root / "held-once")}
    daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=faults(held))
    try:
        wait_event(root, "job_started", job_id=1, timeout=120)
        r = cli(root, "pause")
        assert (r.returncode, r.stdout) == (0, "pause requested; the daemon applies it within a second\n")
        stopping = wait_event(root, "stopping", job_id=1, timeout=60)
        assert (root / "held-once").exists()
        wait_for(lambda: jobs(root)[0]["folder"] == "pending", timeout=120, what="job 1 back to pending")
        (job,) = jobs(root)
        assert job["attempts"][-1]["outcome"] == "stopped", job["attempts"]
        assert job["note"].startswith("stopped on request")
        # The signal was sent while the trainer was held, before its handler was set.
        started = wait_event(root, "job_started", job_id=1)
        assert seconds_between(started["ts"], stopping["ts"]) < HELD_SECONDS - 2
        assert "cold stop" not in (root / "status.log").read_text()

        assert cli(root, "resume").returncode == 0
        wait_for(lambda: jobs(root)[0]["folder"] == "done", timeout=300, what="job 1 resumed and done")
    finally:
        assert stop(daemon) == 0
    account(root, inbox, expect={"a.jsonl": "done"})


def test_a_trainer_that_cannot_be_executed_fails_its_job_and_the_daemon_goes_on(root, tiny_model_dir, tmp_path):
    """The daemon runs from an interpreter that is then removed (a venv deleted under a running service): its
    next trainer cannot be started. The job fails with the reason; the daemon lives and trains the next."""
    write_config(root, tiny_model_dir, limits={"min_free_disk_mb": 1, "max_attempts": 2})
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    os.symlink(os.path.realpath(sys.executable), python)
    (venv / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib").mkdir()
    os.symlink(site, venv / "lib" / site.name)
    log = open(root / "daemon.out", "ab")
    daemon = subprocess.Popen([str(python), str(ENTRY), "run", "--root", str(root)], stdout=log,
                              stderr=subprocess.STDOUT, env=env(), cwd=root)
    inbox = Inbox(root)
    try:
        wait_ready(root, daemon)
        python.unlink()
        inbox.drop("a.jsonl", chat_lines(8))
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["failed"], timeout=120, what="job 1 failed")
        assert daemon.poll() is None  # the daemon lives on
        os.symlink(os.path.realpath(sys.executable), python)
        inbox.drop("b.jsonl", chat_lines(8, topic="y"))
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["failed", "done"], timeout=300, what="job 2 done")
    finally:
        assert stop(daemon) == 0
    fates = account(root, inbox, expect={"a.jsonl": "failed", "b.jsonl": "done"},
                    reasons={"a.jsonl": "the trainer could not be started: [Errno 2] No such file or directory"})
    assert [a["outcome"] for a in fates["a.jsonl"]["attempts"]] == ["failed", "failed"]  # retried, as any failure
    assert "Traceback" not in (root / "daemon.out").read_text()
