"""Poison jobs, a daemon crash loop, out of memory, divergence, a full disk and a broken adapter config:
each one ends its own job cleanly, and the other jobs keep flowing.

CUDA OOM, ENOSPC and NaN cannot be caused on a CPU on demand: they come from the fault hook
(TRAINING_DAEMON_FAULTS, daemon/faults.py), which raises the real exception at the real place.
"""

from __future__ import annotations

import signal

import pytest

from accounting import Inbox, account, faults, file_digests, stop, wait_event, wait_ready
from helpers import chat_lines, cli, events, start_daemon, write_config

pytestmark = pytest.mark.slow


def test_a_poison_job_fails_after_max_attempts_with_every_error_and_the_queue_flows(root, tiny_model_dir):
    write_config(root, tiny_model_dir, limits={"max_attempts": 2, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("poison.jsonl", chat_lines(4, "poison"))
    inbox.drop("good.jsonl", chat_lines(4, "good"))
    poison = {"point": "train_step", "kind": "error", "job_id": 1}

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(poison))
    assert r.returncode == 1  # --once: not every job succeeded

    fates = account(root, inbox, expect={"poison.jsonl": "failed", "good.jsonl": "done"})
    bad = fates["poison.jsonl"]
    assert [a["outcome"] for a in bad["attempts"]] == ["failed", "failed"]
    assert bad["error"].startswith("attempt 1: RuntimeError: injected fault at train_step step 0")
    assert "\n\nattempt 2: RuntimeError: injected fault" in bad["error"]


def test_a_job_that_kills_the_daemon_cannot_make_it_crash_loop(root, tiny_model_dir):
    write_config(root, tiny_model_dir, limits={"max_attempts": 2, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("deadly.jsonl", chat_lines(4, "deadly"))
    inbox.drop("good.jsonl", chat_lines(4, "good"))
    deadly = faults({"point": "job_start", "kind": "kill", "job_id": 1})  # every time job 1 starts

    codes = [cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=deadly).returncode for _ in range(3)]

    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]  # the third start fails job 1 before running it
    fates = account(root, inbox, expect={"deadly.jsonl": "failed", "good.jsonl": "done"},
                    reasons={"deadly.jsonl": "daemon restarted while the job was running"})
    assert [a["outcome"] for a in fates["deadly.jsonl"]["attempts"]] == ["interrupted", "interrupted"]
    assert "interrupted or failed 2 times (max_attempts=2); not retried again" in events(root, "sweep")[-1]["message"]


def test_out_of_memory_is_retried_with_half_the_micro_batch_and_the_same_effective_batch(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"micro_batch_size": 4, "gradient_accumulation": 1,
                                                 "packing": False})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(8))
    oom = {"point": "train_step", "kind": "oom", "micro_batch_gt": 2}  # fits at 2

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(oom))
    assert r.returncode == 0, r.stdout + r.stderr

    job = account(root, inbox)["data.jsonl"]
    assert [(a["micro_batch_size"], a["outcome"]) for a in job["attempts"]] == [(4, "out_of_memory"), (2, "done")]
    assert "retrying with 2 and 2x the accumulation (same effective batch)" in events(root, "oom_retry")[0]["message"]
    meta = (root / "checkpoints/default/v1/metadata.json").read_text()
    assert '"micro_batch_size": 2' in meta and '"gradient_accumulation": 2' in meta


def test_out_of_memory_gives_up_naming_the_sizes_tried(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"micro_batch_size": 4, "packing": False},
                 limits={"oom_retries": 1, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(8))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "train_step", "kind": "oom"}))
    assert r.returncode == 1
    account(root, inbox, reasons={"data.jsonl": "out of memory with micro-batch sizes 4, 2 (oom_retries=1)"})


def test_a_non_finite_loss_fails_the_job_as_diverged_and_publishes_nothing(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"packing": False}, limits={"max_diverged_steps": 2,
                                                                           "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(16))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "train_step", "kind": "nan",
                                                                   "min_step": 2}))
    assert r.returncode == 1
    job = account(root, inbox, reasons={"data.jsonl": "diverged at step 3"})["data.jsonl"]
    assert len(job["attempts"]) == 1  # retrying cannot help
    assert not (root / "checkpoints" / "default" / "v1").exists()


def test_below_the_free_space_floor_no_job_starts_and_the_input_waits(root, tiny_model_dir):
    write_config(root, tiny_model_dir, limits={"min_free_disk_mb": 1 << 40})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", timeout=60)
    assert r.returncode == 1  # --once does not wait for space that nobody is freeing
    assert "waiting before the next job" in events(root, "disk_low")[0]["message"]
    assert not events(root, "job_started")

    write_config(root, tiny_model_dir)  # space again (a lower floor)
    assert cli(root, "run", "--once").returncode == 0
    account(root, inbox)


def test_disk_full_during_a_checkpoint_pauses_the_job_and_keeps_earlier_versions(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"packing": False})
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4, "first"))
    assert cli(root, "run", "--once").returncode == 0
    v1 = file_digests(root / "checkpoints/default/v1")

    inbox.drop("second.jsonl", chat_lines(8, "second"))
    full = {"point": "checkpoint_write", "kind": "enospc", "job_id": 2, "once_file": str(root / "fired")}
    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(full))
    assert r.returncode == 0, r.stdout + r.stderr

    message = events(root, "disk_full")[0]["message"]
    assert "the disk filled up while writing checkpoint step-000002" in message
    assert "input and earlier versions are intact" in message
    job = account(root, inbox)["second.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["disk_full", "done"] and job["version"] == 2
    assert file_digests(root / "checkpoints/default/v1") == v1


def test_disk_full_at_every_publish_fails_the_job_and_keeps_earlier_versions(root, tiny_model_dir):
    # One attempt: the retry itself is shown above; here, that a disk full at every try ends (it used to loop).
    write_config(root, tiny_model_dir, limits={"max_attempts": 1, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4, "first"))
    assert cli(root, "run", "--once").returncode == 0
    v1 = file_digests(root / "checkpoints/default/v1")

    inbox.drop("second.jsonl", chat_lines(4, "second"))
    full = {"point": "version_write", "kind": "enospc", "job_id": 2}
    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(full))
    assert r.returncode == 1

    account(root, inbox, reasons={"second.jsonl": "disk full; input and earlier versions are intact"})
    adapter = root / "checkpoints" / "default"
    # no v2, no staging leftovers (latest.json, its lock and the eval pool belong there)
    assert sorted(p.name for p in adapter.iterdir() if p.suffix not in (".json", ".jsonl", ".lock")) == ["latest", "v1"]
    assert file_digests(adapter / "v1") == v1


def test_a_broken_adapter_config_fails_its_job_not_the_daemon(root, tiny_model_dir):
    config = write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    daemon = start_daemon(root)
    wait_ready(root, daemon)
    override = config.parent / "adapters" / "alpha.yaml"  # appears while the daemon runs
    override.parent.mkdir()
    override.write_text("training:\n  epochs: many\n")
    inbox.drop("a.jsonl", chat_lines(4, "alpha"), adapter="alpha")
    inbox.drop("b.jsonl", chat_lines(4, "beta"))

    wait_event(root, "job_failed")
    wait_event(root, "job_done")
    assert daemon.poll() is None
    assert stop(daemon) == 0
    fates = account(root, inbox, expect={"a.jsonl": "failed", "b.jsonl": "done"},
                    reasons={"a.jsonl": f"config {override} has 1 error"})
    assert "training.epochs" in fates["a.jsonl"]["error"]
