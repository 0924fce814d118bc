"""Hostile neighbours, the files half (issue 13, rows 3, 4, 5, 6 and 13), through the real daemon and CLI.

What is trained is exactly what was hashed: a file that a writer still holds open is taken again whole if it
changes while it is being claimed and failed with the reason if it changes after; a hard link's outside twin
edited later changes nothing. `submit` refuses at once what would never be a job (a device, a name the daemon
ignores), leaves no temporary file behind, and handles a 250-byte name. A duplicate whose original was
cancelled is trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from accounting import Dropped, Inbox, account, faults, stop, wait_event, wait_ready
from helpers import ENTRY, chat_lines, cli, env, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow


def lines(n: int, topic: str) -> bytes:
    return ("\n".join(chat_lines(n, topic)) + "\n").encode()


def inbox_names(root: Path) -> list[str]:
    folder = root / "inbox"
    return sorted(p.name for p in folder.rglob("*")) if folder.is_dir() else []


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr.strip()


# ------------------------------------------------------------------ row 3
def test_a_file_appended_to_after_its_claim_fails_with_the_reason(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    first, more = lines(4, "claimed"), lines(40, "appended later")
    (root / "inbox").mkdir()
    writer = open(root / "inbox" / "slow.jsonl", "wb", buffering=0)  # a writer that pauses, then appends
    writer.write(first)
    # The trainer waits a moment before it validates: the append lands between the claim and the training.
    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults({"point": "validate", "kind": "sleep",
                                                                         "seconds": 4}))
    wait_event(root, "job_queued", timeout=120)
    writer.write(more)
    writer.close()
    assert daemon.wait(timeout=300) == 1

    (job,) = jobs(root)
    assert job["folder"] == "failed" and job["sha256"] == hashlib.sha256(first).hexdigest()
    assert job["size"] == len(first)
    assert "input.jsonl changed after it was claimed" in job["error"]
    assert f"it was {len(first)} B" in job["error"] and f"now {len(first) + len(more)} B" in job["error"]
    assert not list((root / "checkpoints").glob("*/v*/metadata.json"))  # nothing was trained from other bytes
    assert "changed after it was claimed" in (root / "status.log").read_text()


def test_a_file_changed_while_it_is_claimed_is_taken_again_whole(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    first, more = lines(4, "first part"), lines(4, "second part")
    (root / "inbox").mkdir()
    writer = open(root / "inbox" / "paused.jsonl", "wb", buffering=0)
    writer.write(first)
    fired = tmp_path / "claim-slept"  # the claim pauses once, after the file moved into the job folder
    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults(
        {"point": "claim", "kind": "sleep", "seconds": 3, "once_file": str(fired)}))
    wait_for(fired.exists, timeout=120, what="the claim to start")
    writer.write(more)  # the writer comes back while the claim hashes
    writer.close()
    assert daemon.wait(timeout=300) == 0

    inbox = Inbox(root)
    inbox.files.append(Dropped("paused.jsonl", first + more))
    job = account(root, inbox, expect={"paused.jsonl": "done"})["paused.jsonl"]
    assert job["size"] == len(first + more)  # the whole file, as the writer left it
    changing = events(root, "file_changing")
    assert len(changing) == 1 and "is still being written" in changing[0]["message"]


def test_a_hard_links_twin_edited_later_does_not_change_what_trains(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    original = lines(4, "twin")
    twin = tmp_path / "twin.jsonl"
    twin.write_bytes(original)
    (root / "inbox").mkdir()
    os.link(twin, root / "inbox" / "linked.jsonl")
    daemon = start_daemon(root, "--once", TRAINING_DAEMON_FAULTS=faults({"point": "validate", "kind": "sleep",
                                                                         "seconds": 3}))
    wait_event(root, "job_queued", timeout=120)
    with open(twin, "r+b") as f:  # edited in place, through the outside name: the same inode
        f.write(b'{"text": "edited by someone else"}\n')
    assert daemon.wait(timeout=300) == 0

    inbox = Inbox(root)
    inbox.files.append(Dropped("linked.jsonl", original))
    job = account(root, inbox, expect={"linked.jsonl": "done"})["linked.jsonl"]  # source_sha256 = trained bytes
    assert os.stat(Path(job["dir"]) / "input.jsonl").st_nlink == 1  # a private copy
    assert twin.read_bytes().startswith(b'{"text": "edited by someone else"}\n')  # the twin was left alone


# ------------------------------------------------------------------ rows 4, 5, 6
def test_submit_refuses_devices_fifos_and_folders_at_once(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    os.mkfifo(tmp_path / "pipe.jsonl")
    for path, what in (("/dev/zero", "a character device"), (tmp_path / "pipe.jsonl", "a FIFO"),
                       (tmp_path, "a directory")):
        r = cli(root, "submit", str(path), timeout=30)  # reading any of them would never end
        assert one_line_error(r) == f"Error: {path} is {what}: only regular files can be submitted"
    assert inbox_names(root) == []


def test_submit_over_the_size_limit_or_failing_mid_copy_leaves_nothing(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir, intake={"settle_seconds": 0.2, "rescan_seconds": 1, "max_file_bytes": 4096})
    big = tmp_path / "big.jsonl"
    big.write_bytes(lines(200, "big"))
    r = cli(root, "submit", str(big))
    assert one_line_error(r) == f"Error: {big} is {big.stat().st_size} bytes, over intake.max_file_bytes (4096)"
    assert inbox_names(root) == []

    # A write that fails half-way (what a full disk does): a file-size limit stops the copy at 1 KiB.
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    medium = tmp_path / "medium.jsonl"
    medium.write_bytes(lines(20, "medium"))
    assert 1024 < medium.stat().st_size < 4096
    r = subprocess.run([sys.executable, str(ENTRY), "submit", str(medium), "--root", str(root)], capture_output=True,
                       text=True, timeout=60, env=env(), cwd=root, preexec_fn=small_files)
    assert one_line_error(r).startswith(f"Error: cannot copy {medium} into the inbox after ")
    assert "nothing was left there" in r.stderr
    assert inbox_names(root) == []  # no temporary file either


def test_submit_refuses_names_the_daemon_would_ignore(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    for name in (".hidden.jsonl", "upload.part", "upload.tmp"):
        (tmp_path / name).write_bytes(lines(2, name))
        r = cli(root, "submit", str(tmp_path / name))
        assert "the daemon ignores files whose name starts with '.' or ends in .tmp, .part" in one_line_error(r)
    assert inbox_names(root) == []
    r = cli(root, "run", "--once", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert jobs(root) == []


def test_submit_of_a_250_byte_name_twice_trains_both(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    name = "n" * 244 + ".jsonl"  # 250 bytes: the old temporary name (.NAME.PID.part) was over 255
    src = tmp_path / name
    inbox = Inbox(root)
    for topic in ("one", "two"):
        src.write_bytes(lines(4, topic))
        r = cli(root, "submit", str(src))
        assert r.returncode == 0, r.stderr
        dest = Path(r.stdout.strip().split(" -> ")[1].rsplit(" (sha256", 1)[0])
        assert len(os.fsencode(dest.name)) <= 255
        inbox.files.append(Dropped(dest.name, src.read_bytes()))
    assert inbox.files[0].name == name and inbox.files[1].name.endswith(" (2).jsonl")
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox, expect={f.name: "done" for f in inbox.files})


# ------------------------------------------------------------------ row 13
def test_a_duplicate_of_a_cancelled_job_is_trained(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    assert cli(root, "pause").returncode == 0  # nothing starts until both are queued and the first cancelled
    inbox = Inbox(root)
    inbox.drop("monday.jsonl", chat_lines(4))
    inbox.drop("tuesday.jsonl", chat_lines(4))  # byte for byte the same
    daemon = start_daemon(root)
    try:
        wait_ready(root, daemon)
        queued = wait_event(root, "job_queued", job_id=2)
        assert "same bytes as job 1, not finished yet" in queued["message"]
        r = cli(root, "cancel", "1")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["failed", "pending"], timeout=60,
                 what="job 1 to be cancelled")
        assert cli(root, "resume").returncode == 0
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["failed", "done"], timeout=300,
                 what="job 2 to be trained")
    finally:
        assert stop(daemon) == 0
    fates = account(root, inbox, expect={"monday.jsonl": "failed", "tuesday.jsonl": "done"})
    trained = fates["tuesday.jsonl"]
    assert trained["duplicate_of"] is None and trained["version"] == 1  # trained, not "done, duplicate"
    assert trained["note"] == "same bytes as job 1, which failed or was cancelled: trained"
    meta = json.loads((root / "checkpoints/default/v1/metadata.json").read_text())
    assert meta["job_id"] == 2


def test_submit_interrupted_by_ctrl_c_leaves_no_temporary_file(root, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from daemon.paths import Layout
    from daemon.supervisor import submit

    def interrupted(fd, data):
        raise KeyboardInterrupt  # what Ctrl-C does in the middle of the copy

    src = tmp_path / "data.jsonl"
    src.write_bytes(lines(4, "ctrl-c"))
    monkeypatch.setattr(submit.os, "write", interrupted)
    cfg = SimpleNamespace(max_file_bytes=1 << 20, ignore_suffixes=[".tmp", ".part"])
    with pytest.raises(KeyboardInterrupt):
        submit.submit_file(Layout.at(root), src, "default", cfg)
    assert inbox_names(root) == []
