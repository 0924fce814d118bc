"""A trainer that hangs is killed as "stalled" and the queue goes on; what systemd shows (STATUS=) follows the
daemon through every state; an error that would fail every job (the base model gone, the GPUs asked for not
there) blocks the queue instead, fails nothing, and the queue goes on by itself once it is fixed.

The real daemon and trainer, as processes: a hang comes from the fault hook (TRAINING_DAEMON_FAULTS, kind
`hang`: the trainer sleeps where it is until it is killed), a base model goes away by renaming its folder.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from accounting import Inbox, account, faults, stop, wait_event, wait_ready
from helpers import chat_lines, cli, events, start_daemon, wait_for, write_config
from test_notify import FakeSystemd

pytestmark = pytest.mark.slow


def _statuses(msgs: list[dict]) -> list[str]:
    return [m["STATUS"] for m in msgs if "STATUS" in m]


def _first_index(statuses: list[str], text: str) -> int:
    return next(i for i, s in enumerate(statuses) if text in s)


def test_a_hung_trainer_is_killed_as_stalled_and_the_next_file_trains(root, tiny_model_dir):
    # start_timeout covers the imports on a loaded machine; the stall timeout is what the hang meets. It also
    # covers validating and loading (no event between them): 20 s, not less, for a busy 2-core runner.
    write_config(root, tiny_model_dir, limits={"max_attempts": 2, "min_free_disk_mb": 1, "stall_timeout_seconds": 20,
                                               "start_timeout_seconds": 300})
    inbox = Inbox(root)
    inbox.drop("hung.jsonl", chat_lines(4, "hung"))
    inbox.drop("good.jsonl", chat_lines(4, "good"))
    hang = {"point": "train_step", "kind": "hang", "job_id": 1}
    systemd = FakeSystemd(abstract=True)
    try:
        msgs = systemd.collect_in_background()
        r = cli(root, "run", "--once", timeout=600, TRAINING_DAEMON_FAULTS=faults(hang),
                NOTIFY_SOCKET=systemd.env_value)
    finally:
        systemd.close()
    assert r.returncode == 1, r.stdout + r.stderr  # --once: not every job succeeded

    fates = account(root, inbox, expect={"hung.jsonl": "failed", "good.jsonl": "done"})
    hung = fates["hung.jsonl"]
    assert [a["outcome"] for a in hung["attempts"]] == ["stalled", "stalled"]
    assert hung["error"].startswith("attempt 1: stalled: no event from the trainer for ")
    assert "(last event: phase training" in hung["error"]
    assert "last lines of j000001/trainer.log:" in hung["error"]
    stalled = events(root, "stalled")
    assert len(stalled) == 2 and all(e["level"] == "warning" and e["job_id"] == 1 for e in stalled)
    assert "killing its trainer" in stalled[0]["message"]
    assert "job 1 failed (attempt 1 of 2), will retry: stalled: no event" in events(root, "job_retry")[0]["message"]

    # What `systemctl status` showed, in order: every state of the daemon, not only the progress lines.
    statuses = _statuses(msgs)
    order = ["idle: watching", "job 1 (default): starting", "job 1 (default): validating hung.jsonl",
             "job 1 (default): loading the model", "training job 1 (default)", "job 1 (default): stalled",
             "job 2 (default): starting", "training job 2 (default)", "job 2 (default): publishing the new version"]
    positions = [_first_index(statuses, text) for text in order]
    assert positions == sorted(positions), statuses
    assert any(s.startswith("idle: watching") for s in statuses[positions[-1]:]), statuses  # idle again
    assert msgs[-1].get("STOPPING") == "1"
    assert all(a != b for a, b in zip(statuses, statuses[1:])), "a STATUS= that said nothing new"


def _own_base_model(root, tiny_model_dir):
    """A copy of the tiny model that this test may take away (the session's one is shared)."""
    base = root / "base-model"
    shutil.copytree(tiny_model_dir, base)
    return base


def test_a_missing_base_model_blocks_the_queue_fails_nothing_and_it_goes_on_once_back(root, tiny_model_dir):
    base = _own_base_model(root, tiny_model_dir)
    write_config(root, base)
    inbox = Inbox(root)
    systemd = FakeSystemd(abstract=True)
    msgs = systemd.collect_in_background()
    daemon = start_daemon(root, NOTIFY_SOCKET=systemd.env_value)
    try:
        wait_ready(root, daemon)
        os.rename(base, root / "base-model.away")
        for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
            inbox.drop(name, chat_lines(4, name[0]))

        blocked = wait_event(root, "blocked")
        assert "base model unavailable: the folder" in blocked["message"] and "does not exist" in blocked["message"]
        assert blocked["level"] == "error"
        wait_for(lambda: json.loads((root / "status.json").read_text())["queue"]["pending"] == 3, timeout=60,
                 what="three pending jobs")
        daemon_state = json.loads((root / "status.json").read_text())["daemon"]
        assert daemon_state["state"] == "blocked"
        assert "base model unavailable" in daemon_state["blocked"]["reason"]
        shown = cli(root, "status").stdout
        assert "blocked" in shown and "base model unavailable: the folder" in shown
        assert not events(root, "job_started") and not events(root, "job_failed")
        wait_for(lambda: any(s.startswith("blocked, no job starts: base model unavailable")
                             for s in _statuses(msgs)), timeout=30, what="STATUS= saying blocked")

        os.rename(root / "base-model.away", base)
        assert cli(root, "resume").returncode == 0  # re-checks at once (it would within RECHECK_SECONDS anyway)
        wait_for(lambda: len(events(root, "job_done")) == 3, timeout=400, what="all three jobs done")
        assert "fixed; jobs start again" in events(root, "unblocked")[0]["message"]
        assert json.loads((root / "status.json").read_text())["daemon"]["blocked"] is None
    finally:
        assert stop(daemon) == 0
        systemd.close()
    fates = account(root, inbox, expect={n: "done" for n in ("a.jsonl", "b.jsonl", "c.jsonl")})
    assert all([a["outcome"] for a in job["attempts"]] == ["done"] for job in fates.values())


@pytest.mark.parametrize("point, seen", [("job_start", "job_started"), ("load", "validated")])
def test_a_base_model_gone_under_a_running_attempt_puts_the_job_back_without_counting_it(root, tiny_model_dir,
                                                                                        point, seen):
    """job_start: the trainer finds the base gone when it resolves it (error.json kind `unavailable`); load: the
    model's loading fails, and the daemon finds the cause is the machine's, not the job's."""
    base = _own_base_model(root, tiny_model_dir)
    write_config(root, base, limits={"max_attempts": 1, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    slow = faults({"point": point, "kind": "sleep", "seconds": 10, "once_file": str(root / "slept")})
    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=slow)
    wait_event(root, seen, timeout=300)
    os.rename(base, root / "base-model.away")
    assert daemon.wait(timeout=300) == 1  # --once: nobody brings the base model back for it

    job = json.loads(next((root / "queue" / "pending").glob("j*/job.json")).read_text())
    assert [a["outcome"] for a in job["attempts"]] == ["unavailable"]
    assert "base model unavailable" in job["note"] and not job.get("error")
    assert "the attempt not counted: base model unavailable" in events(root, "job_blocked")[0]["message"]
    assert not events(root, "job_failed")

    os.rename(root / "base-model.away", base)
    r = cli(root, "run", "--once", timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr  # max_attempts is 1: the blocked attempt did not count
    job = account(root, inbox)["data.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["unavailable", "done"]


def test_gpus_that_are_not_there_block_the_queue_instead_of_failing_the_job(root, tiny_model_dir):
    write_config(root, tiny_model_dir, gpus=[999])
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", timeout=120)
    assert r.returncode == 1  # the job waits, intact: --once says it did not drain the queue
    message = events(root, "blocked")[0]["message"]
    assert message.startswith("blocked, no job starts: gpus: ") and "999" in message  # not visible / no GPU seen
    assert "re-checked every 10s" in message and "no job fails meanwhile" in message
    assert not events(root, "job_started") and not list((root / "queue" / "failed").glob("j*"))
    assert len(list((root / "queue" / "pending").glob("j*"))) == 1

    write_config(root, tiny_model_dir)  # the config fixed (or the GPU back): the job trains
    assert cli(root, "run", "--once", timeout=400).returncode == 0
    job = account(root, inbox)["data.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["done"]
