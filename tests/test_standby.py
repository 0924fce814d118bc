"""The next job's trainer, started early (trainer_prestart): it trains the job, and never outlives the daemon."""

from __future__ import annotations

import json
import os
import signal

import pytest

from accounting import trainer_pids
from helpers import chat_lines, drop, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow


def standby_pids(root) -> list[int]:
    out = []
    for pid in trainer_pids(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--standby" in f.read().split(b"\0"):
                    out.append(pid)
        except OSError:
            pass
    return out


def launches(root) -> list[dict]:
    """How each job's trainer was started (with a GPU there is also a "training on GPU 0" launch line)."""
    return [e for e in events(root) if e["event"] == "launch" and "pid" in e]


@pytest.fixture
def prestart_config(root, tiny_model_dir):
    return write_config(root, tiny_model_dir, trainer_prestart=True,
                        status={"log_level": "debug", "web": {"enabled": False}})


def test_the_early_trainer_trains_the_next_file_and_another_waits_after_it(root, prestart_config):
    daemon = start_daemon(root, "--config", str(prestart_config))
    try:
        (early,) = wait_for(lambda: standby_pids(root), timeout=60, what="a trainer started before any file")
        drop(root, "chats.jsonl", chat_lines(6))
        wait_for(lambda: [j for j in jobs(root) if j["folder"] == "done"], timeout=180, what="the job to finish")
        (launch,) = launches(root)
        assert launch["pid"] == early and "started early" in launch["message"]
        job_dir = root / "queue" / "done" / "j000001"
        assert (job_dir / "result.json").exists()
        assert "Traceback" not in (job_dir / "trainer.log").read_text()
        version = json.loads((job_dir / "job.json").read_text())["version"]
        assert (root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors").exists()
        # the next one, a new process, was started while the job trained: its imports overlap the training
        (second,) = wait_for(lambda: standby_pids(root), timeout=60, what="the next early trainer")
        assert second != early
        rows = events(root)
        started = [i for i, e in enumerate(rows) if e["event"] == "standby" and e.get("pid") == second]
        assert started and started[0] < [i for i, e in enumerate(rows) if e["event"] == "job_done"][0]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert trainer_pids(root) == []  # the waiting trainer ends with the daemon


def test_a_waiting_trainer_exits_when_its_daemon_is_killed(root, prestart_config):
    daemon = start_daemon(root, "--config", str(prestart_config))
    (early,) = wait_for(lambda: standby_pids(root), timeout=60, what="a trainer started before any file")
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    wait_for(lambda: early not in trainer_pids(root), timeout=30, what="the orphaned early trainer to exit")
    # and nothing it left holds the device: a new daemon trains a file at once
    drop(root, "chats.jsonl", chat_lines(4))
    daemon = start_daemon(root, "--config", str(prestart_config), "--once")
    assert daemon.wait(180) == 0
    assert [j["folder"] for j in jobs(root)] == ["done"]
    assert trainer_pids(root) == []


def test_off_by_default_without_a_gpu(root, tiny_model_dir):
    config = write_config(root, tiny_model_dir)
    daemon = start_daemon(root, "--config", str(config), CUDA_VISIBLE_DEVICES="")  # no GPU, also on a GPU host
    try:
        wait_for(lambda: (root / "status.json").exists(), timeout=30, what="the daemon to start")
        assert standby_pids(root) == []  # status.json is written after the place it would have started
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0


def test_a_trainer_that_cannot_import_its_stack_fails_the_job_with_the_reason(root, tiny_model_dir, tmp_path):
    # A broken library (here: a peft that raises on import) in the early trainer: the job it is handed must
    # fail with that reason in its own error.json and trainer.log, not as "exited with status 1" and nothing.
    broken = tmp_path / "broken"
    (broken / "peft").mkdir(parents=True)
    (broken / "peft" / "__init__.py").write_text('raise ImportError("this peft is broken (test)")\n')
    config = write_config(root, tiny_model_dir, trainer_prestart=True, limits={"max_attempts": 1},
                          status={"log_level": "debug", "web": {"enabled": False}})
    pythonpath = os.pathsep.join(filter(None, [str(broken), os.environ.get("PYTHONPATH")]))
    daemon = start_daemon(root, "--config", str(config), PYTHONPATH=pythonpath)
    try:
        wait_for(lambda: standby_pids(root), timeout=60, what="a trainer started before any file")
        drop(root, "chats.jsonl", chat_lines(4))
        (job,) = wait_for(lambda: [j for j in jobs(root) if j["folder"] == "failed"], timeout=120,
                          what="the job to fail")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert "started early" in launches(root)[0]["message"]  # the early trainer had it, not a fresh one
    assert "this peft is broken (test)" in job["error"]
    job_dir = root / "queue" / "failed" / "j000001"
    assert "this peft is broken (test)" in json.loads((job_dir / "error.json").read_text())["message"]
    assert "ImportError" in (job_dir / "trainer.log").read_text()
    assert (job_dir / "input.jsonl").exists()
