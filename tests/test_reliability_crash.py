"""Crash recovery: kill -9 the daemon or the trainer at every stage, restart, and find every file's fate.

Each test kills a real process (a fault of kind kill sends SIGKILL to the process that reaches the point,
or the test sends it), restarts the daemon, and accounts for every dropped file (tests/accounting.py).
"""

from __future__ import annotations

import fcntl
import os
import signal

import pytest

import resume_case
from accounting import Inbox, TrainerWatch, account, faults, resumes, trainer_pids, wait_event
from helpers import chat_lines, cli, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow


def once(root, name="fired") -> str:
    return str(root / name)


def test_trainer_killed_mid_training_resumes_to_the_same_adapter(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    resume_case.configure(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop(resume_case.NAME, resume_case.LINES)
    kill = {"point": "train_step", "kind": "kill", "step": 5, "once_file": once(root)}  # during step 6

    with TrainerWatch(root) as watch:
        r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(kill))
    assert r.returncode == 0, r.stdout + r.stderr

    job = account(root, inbox)[resume_case.NAME]
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "done"]
    assert "killed by signal 9" in job["attempts"][0]["error"]
    assert [(e["checkpoint"], e["step"]) for e in resumes(root)] == [("step-000004", 4)]
    assert watch.most == 1
    resume_case.assert_same_adapter(root, expected)


def test_daemon_killed_mid_training_its_trainer_exits_and_a_restart_resumes(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    resume_case.configure(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop(resume_case.NAME, resume_case.LINES)

    with TrainerWatch(root) as watch:
        daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=faults(resume_case.SLOW_STEPS))
        wait_event(root, "checkpoint", step=2)
        (trainer,) = trainer_pids(root)
        daemon.kill()
        daemon.wait()
        # Nobody kills the orphan: its lifeline pipe (and PR_SET_PDEATHSIG) make it exit on its own.
        wait_for(lambda: trainer not in trainer_pids(root), timeout=10, what="the orphaned trainer to exit")
        assert [j["folder"] for j in jobs(root)] == ["running"]
        r = cli(root, "run", "--once")  # at once: the kernel released the dead daemon's lock
    assert r.returncode == 0, r.stdout + r.stderr

    job = account(root, inbox)[resume_case.NAME]
    assert [a["outcome"] for a in job["attempts"]] == ["interrupted", "done"]
    assert "daemon restarted while the job was running" in job["attempts"][0]["error"]
    assert resumes(root)[0]["step"] >= 2
    assert watch.most == 1
    resume_case.assert_same_adapter(root, expected)


def test_kill_during_a_checkpoint_write_keeps_the_older_complete_one(root, tiny_model_dir, tmp_path_factory):
    expected = resume_case.reference(tmp_path_factory, tiny_model_dir)
    resume_case.configure(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop(resume_case.NAME, resume_case.LINES)
    stuck = {"point": "checkpoint_write", "kind": "hang", "step": 4, "once_file": once(root)}

    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults(stuck))
    resume = root / "queue" / "running" / "j000001" / "resume"
    half = wait_for(lambda: next(resume.glob(".tmp-step-000004-*/config.json"), None), what="a half-written checkpoint")
    assert (half.parent / "adapter.safetensors").exists() and not (half.parent / "COMPLETE").exists()
    assert (resume / "step-000002" / "COMPLETE").exists()  # the older one stays until a newer one is complete
    (trainer,) = trainer_pids(root)
    os.kill(trainer, signal.SIGKILL)
    assert daemon.wait(timeout=180) == 0

    account(root, inbox)
    assert [e["checkpoint"] for e in resumes(root)] == ["step-000002"]
    resume_case.assert_same_adapter(root, expected)


def test_daemon_killed_mid_claim_the_file_becomes_exactly_one_job(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "claim", "kind": "kill",
                                                                   "once_file": once(root)}))
    assert r.returncode == -signal.SIGKILL
    assert not (root / "inbox" / "data.jsonl").exists()  # the bytes are in a half-made job folder ...
    assert len(list((root / "queue" / "pending").glob(".claim-j000001/input.jsonl"))) == 1

    r = cli(root, "run", "--once")  # ... which the start-up sweep completes
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left half-made by a crash during intake" in events(root, "sweep")[0]["message"]
    account(root, inbox)


def test_trainer_killed_after_publishing_is_not_trained_twice(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "published", "kind": "kill",
                                                                   "once_file": once(root)}))
    assert r.returncode == 0, r.stdout + r.stderr

    job = account(root, inbox)["data.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "done"]
    adapter = root / "checkpoints" / "default"
    assert sorted(p.name for p in adapter.iterdir() if p.suffix not in (".json", ".jsonl", ".lock")) == ["latest", "v1"]
    assert os.readlink(adapter / "latest") == "v1"  # the link the kill left stale is repaired
    assert '"recovered": true' in (root / "queue" / "done" / "j000001" / "result.json").read_text()


def test_daemon_killed_before_recording_a_finished_job_records_it_once(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "job_end", "kind": "kill",
                                                                   "once_file": once(root)}))
    assert r.returncode == -signal.SIGKILL
    assert [j["folder"] for j in jobs(root)] == ["running"] and (root / "checkpoints/default/v1").is_dir()

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    job = account(root, inbox)["data.jsonl"]
    assert (job["version"], [a["outcome"] for a in job["attempts"]]) == (1, ["interrupted", "done"])
    assert not (root / "checkpoints" / "default" / "v2").exists()


def test_daemon_killed_during_publish_leaves_no_half_version(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    stuck = {"point": "version_write", "kind": "hang", "once_file": once(root)}

    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults(stuck))
    adapter = root / "checkpoints" / "default"
    wait_for(lambda: next(adapter.glob(".tmp-job1-*/metadata.json"), None), what="a staged version")
    (trainer,) = trainer_pids(root)
    daemon.kill()
    daemon.wait()
    wait_for(lambda: trainer not in trainer_pids(root), timeout=10, what="the orphaned trainer to exit")
    assert not (adapter / "v1").exists()

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
    # the staging folder is gone (latest.json, its lock and the eval pool belong there)
    assert sorted(p.name for p in adapter.iterdir() if p.suffix not in (".json", ".jsonl", ".lock")) == ["latest", "v1"]


def test_no_second_trainer_while_an_earlier_one_holds_the_trainer_lock(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    (root / "state").mkdir()
    stray = os.open(root / "state" / "trainer-cpu0.lock", os.O_RDWR | os.O_CREAT)  # as a trainer on the CPU holds it
    fcntl.flock(stray, fcntl.LOCK_EX)

    with TrainerWatch(root) as watch:
        daemon = start_daemon(root, "--once")
        wait_event(root, "waiting_for_trainer", timeout=30)
        assert daemon.poll() is None and watch.most == 0
        assert [j["folder"] for j in jobs(root)] == ["pending"]
        os.close(stray)  # the earlier trainer exits
        assert daemon.wait(timeout=120) == 0
    assert watch.most == 1
    account(root, inbox)
