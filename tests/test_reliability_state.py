"""State the daemon cannot read, and the config a retried job takes, through the real daemon and CLI.

A job folder whose job.json is cut short, not JSON or missing fields is never skipped: readers (`jobs`) show it
as broken without touching it, and the daemon sets it aside in queue/failed/ with its reason and its input
intact, `run --once` exiting 1. `retry` gives a failed job the config as it is now (daemon.yaml and the
adapter's override), written down in the job's history and status.log; `retry --same-config` keeps the old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from accounting import Inbox, account, stop, wait_event, wait_ready
from helpers import chat_lines, cli, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow


def job_dir(root: Path, job_id: int) -> Path:
    return next(root.glob(f"queue/*/j{job_id:06d}"))


def queue_without_training(root: Path, *job_ids: int) -> None:
    """Take the inbox into pending jobs and stop there: a paused daemon claims the files and trains nothing."""
    assert cli(root, "pause").returncode == 0
    daemon = start_daemon(root)
    try:
        wait_ready(root, daemon)
        for job_id in job_ids:
            wait_event(root, "job_queued", job_id=job_id, timeout=60)
    finally:
        assert stop(daemon) == 0
    assert cli(root, "resume").returncode == 0


def log_lines(root: Path, level: str) -> list[str]:
    return [line for line in (root / "status.log").read_text().splitlines() if f" {level.upper():5} " in line]


# ---------------------------------------------------------------- point 3: unreadable state
def test_a_pending_jobs_cut_short_manifest_fails_the_job_with_its_reason(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("cut.jsonl", chat_lines(4, "cut"))
    inbox.drop("fine.jsonl", chat_lines(4, "fine"))
    queue_without_training(root, 1, 2)
    manifest = root / "queue" / "pending" / "j000001" / "job.json"
    whole = manifest.read_bytes()
    manifest.write_bytes(whole[: len(whole) // 2])  # a torn write on a filesystem without ordered data

    # A reader shows it as broken and moves nothing: only the daemon changes state.
    r = cli(root, "jobs")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("1 "))
    assert "pending" in row and "job.json is not valid JSON" in row
    listed = json.loads(cli(root, "jobs", "--json").stdout)
    assert [j["id"] for j in listed] == [1, 2] and listed[0]["unreadable"].startswith("job.json is not valid JSON")
    assert manifest.read_bytes() == whole[: len(whole) // 2]

    r = cli(root, "run", "--once", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # the queue went on, and the run says it was not clean
    fates = account(root, inbox, expect={"cut.jsonl": "failed", "fine.jsonl": "done"},
                    reasons={"cut.jsonl": "job.json could not be read (job.json is not valid JSON"})
    failed = Path(fates["cut.jsonl"]["dir"])
    assert (failed / "job.json.unreadable").read_bytes() == whole[: len(whole) // 2]  # kept for a post-mortem
    assert "`training-daemon retry 1` queues it again" in fates["cut.jsonl"]["error"]
    [line] = [line for line in log_lines(root, "error") if "job 1 failed: job.json could not be read" in line]
    assert "set aside with its input intact" in line
    [event] = events(root, "job_unreadable")
    assert (event["level"], event["job_id"], event["adapter"], event["file"]) == ("error", 1, "default", "cut.jsonl")
    assert not [e for e in events(root, "job_started") if e.get("job_id") == 1]
    r = cli(root, "jobs")
    row = next(line for line in r.stdout.splitlines() if line.startswith("1 "))
    assert "failed" in row and "default" in row and "cut.jsonl" in row and "job.json could not be read" in row

    # Rebuilt from the daemon's own records, it can be retried like any failed job.
    r = cli(root, "retry", "1")
    assert r.returncode == 0, r.stderr
    assert cli(root, "run", "--once", timeout=300).returncode == 0
    account(root, inbox, expect={"cut.jsonl": "done", "fine.jsonl": "done"})


def test_unreadable_manifests_in_running_and_done_are_set_aside_at_start(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("trained.jsonl", chat_lines(4, "trained"))
    assert cli(root, "run", "--once", timeout=300).returncode == 0
    inbox.drop("crashed.jsonl", chat_lines(4, "crashed"))
    inbox.drop("orphan.jsonl", chat_lines(4, "orphan"))
    queue_without_training(root, 2, 3)
    (job_dir(root, 1) / "job.json").write_text("[]")  # a done job, its version published
    # What a daemon killed mid-job leaves, with a manifest that lost its fields; and a folder with none at all.
    os.rename(root / "queue" / "pending" / "j000002", root / "queue" / "running" / "j000002")
    (root / "queue" / "running" / "j000002" / "job.json").write_text('{"id": 2}')
    (root / "queue" / "pending" / "j000003" / "job.json").unlink()
    before = cli(root, "jobs", "--json")
    assert [(j["id"], j["state"], j.get("unreadable")) for j in json.loads(before.stdout)] == [
        (1, "done", "job.json holds a JSON list, not an object"),
        (2, "running", "job.json lacks adapter, original_name"), (3, "pending", "job.json is missing")]

    r = cli(root, "run", "--once", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    fates = account(root, inbox, expect={"trained.jsonl": "failed", "crashed.jsonl": "failed",
                                         "orphan.jsonl": "failed"})
    assert fates["trained.jsonl"]["version"] == 1
    assert "the version it published (default v1) is untouched" in fates["trained.jsonl"]["error"]
    assert (root / "checkpoints" / "default" / "v1" / "metadata.json").is_file()
    assert "job.json lacks adapter, original_name" in fates["crashed.jsonl"]["error"]
    assert "job.json is missing" in fates["orphan.jsonl"]["error"]
    assert sorted(e["job_id"] for e in events(root, "job_unreadable")) == [1, 2, 3]
    assert not events(root, "job_started")[1:]  # only the first run's job ever trained
    assert not [e for e in events(root, "sweep") if "back to pending" in e["message"]]


# ---------------------------------------------------------------- point 7: retry and the config
def test_retry_takes_the_fixed_config_and_same_config_keeps_the_old_one(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"min_examples": 50})
    inbox = Inbox(root)
    inbox.drop("small.jsonl", chat_lines(4))
    assert cli(root, "run", "--once", timeout=300).returncode == 1
    first = jobs(root)[0]
    assert first["state"] == "failed" and "at least 50 needed" in first["error"]
    snapshot = job_dir(root, 1) / "config.json"
    assert json.loads(snapshot.read_text())["training"]["min_examples"] == 50

    # Fixed in daemon.yaml; --same-config keeps what the job had, so it fails the same way again.
    write_config(root, tiny_model_dir)
    r = cli(root, "retry", "1", "--same-config")
    assert (r.returncode, r.stdout.strip()) == (0, "job 1 queued again with its config snapshot kept"), r.stderr
    assert cli(root, "run", "--once", timeout=300).returncode == 1
    again = jobs(root)[0]
    assert again["state"] == "failed" and "at least 50 needed" in again["error"]
    assert json.loads(snapshot.read_text())["training"]["min_examples"] == 50

    # An invalid config is refused, every error in one message, and the job stays as it was.
    write_config(root, tiny_model_dir, training={"epochs": 0, "max_length": 5})
    r = cli(root, "retry", "1")
    assert r.returncode == 1 and r.stderr.count("Error:") == 1, r.stderr
    assert "retry: job 1 not queued again: the current config for adapter default is invalid" in r.stderr
    assert "training.epochs" in r.stderr and "training.max_length" in r.stderr
    assert jobs(root)[0]["state"] == "failed"

    # A plain retry takes the config as it is now, and says what changed.
    write_config(root, tiny_model_dir)
    r = cli(root, "retry", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "job 1 queued again with the current config (training.min_examples: 50 -> 1)"
    assert any("job 1 queued again with the current config (training.min_examples: 50 -> 1)" in line
               for line in log_lines(root, "info"))
    mark = jobs(root)[0]["attempts"][-1]
    assert (mark["outcome"], mark["config"], mark["config_changes"]) == (
        "retried_by_user", "current", ["training.min_examples: 50 -> 1"])
    assert cli(root, "run", "--once", timeout=300).returncode == 0
    account(root, inbox, expect={"small.jsonl": "done"})
    assert json.loads((job_dir(root, 1) / "config.json").read_text())["training"]["min_examples"] == 1
    assert [a.get("config") for a in jobs(root)[0]["attempts"] if a["outcome"] == "retried_by_user"] == [
        "kept", "current"]


def test_a_running_daemon_retries_with_the_adapters_fixed_override(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    override = root / "config" / "adapters" / "mine.yaml"
    override.parent.mkdir(parents=True)
    override.write_text(yaml.safe_dump({"training": {"min_examples": 50}}))
    inbox = Inbox(root)
    inbox.drop("small.jsonl", chat_lines(4), adapter="mine")
    daemon = start_daemon(root)
    try:
        wait_ready(root, daemon)
        wait_event(root, "job_failed", job_id=1, timeout=300)
        assert "at least 50 needed" in jobs(root)[0]["error"]

        # --same-config travels with the request: the daemon keeps the old snapshot and the job fails again.
        override.write_text(yaml.safe_dump({"training": {"min_examples": 2}}))
        r = cli(root, "retry", "1", "--same-config")
        assert (r.returncode, r.stdout.strip()) == (0, "retry requested; the daemon applies it within a second")
        wait_event(root, "retry", message="job 1 queued again with its config snapshot kept", timeout=60)
        wait_for(lambda: len(events(root, "job_failed")) == 2, timeout=300, what="job 1 to fail again")
        assert "at least 50 needed" in jobs(root)[0]["error"]

        # The plain retry: the daemon reads the override as it is now.
        r = cli(root, "retry", "1")
        assert r.returncode == 0, r.stderr
        wait_event(root, "retry", timeout=60,
                   message="job 1 queued again with the current config (training.min_examples: 50 -> 2)")
        wait_event(root, "job_done", job_id=1, timeout=300)
    finally:
        assert stop(daemon) == 0
    account(root, inbox, expect={"small.jsonl": "done"})
    snapshot = json.loads((job_dir(root, 1) / "config.json").read_text())
    assert snapshot["training"]["min_examples"] == 2
