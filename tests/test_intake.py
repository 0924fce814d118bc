"""The inbox through real files and a real watchdog observer: settle, order, names, folders, hostile entries, claims.

Duplicates and the watch loop itself (events, a stopped observer, a deleted inbox, polling) are
tests/test_intake_watch.py, which uses the helpers and fixtures here."""

from __future__ import annotations

import hashlib
import json
import os
import time
from types import SimpleNamespace

import pytest

from daemon.supervisor.intake import Intake, scan_inbox
from daemon.supervisor.job import JobStatus
from daemon.paths import Layout
from daemon.supervisor.spool import Spool
from daemon.supervisor.status import StatusWriter


@pytest.fixture
def layout(root):
    return Layout.at(root).ensure()


def make_intake(layout, **cfg):
    settings = dict(settle_seconds=0.2, rescan_seconds=0.3, polling=False, duplicate_policy="skip",
                    max_line_bytes=1 << 20, ignore_suffixes=[".tmp", ".part"])
    settings.update(cfg)
    intake = Intake(layout, SimpleNamespace(**settings), Spool(layout), StatusWriter(layout, echo=False))
    intake.start()
    return intake


@pytest.fixture
def intake(layout):
    intake = make_intake(layout)
    yield intake
    intake.stop()


def poll_for(intake, want: int, timeout: float = 5.0) -> list:
    """Poll like the daemon loop until `want` jobs came out (or the timeout)."""
    jobs, deadline = [], time.monotonic() + timeout
    while len(jobs) < want and time.monotonic() < deadline:
        jobs += intake.poll(0.1)
    return jobs


def poll_for_a_while(intake, seconds: float) -> list:
    jobs, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        jobs += intake.poll(0.1)
    return jobs


def events(layout, kind=None):
    if not layout.events.exists():
        return []
    rows = [json.loads(line) for line in layout.events.read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


def drop(folder, name, data: bytes = b'{"text": "hi"}\n'):
    """Write elsewhere, then rename in: a careful user."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{len(data)}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, folder / name)
    return folder / name


def test_arrival_order_and_ids_persist_across_restarts(layout):
    now = time.time()
    for i, name in enumerate(["c.jsonl", "a.jsonl", "b.jsonl"]):  # all present at the first scan: mtime decides
        path = layout.inbox / name
        path.write_text(name)
        os.utime(path, (now - 100 + i, now - 100 + i))
    intake = make_intake(layout)
    try:
        jobs = poll_for(intake, 3)
        assert [(j.id, j.original_name) for j in jobs] == [(1, "c.jsonl"), (2, "a.jsonl"), (3, "b.jsonl")]
        assert [e["file"] for e in events(layout, "job_queued")] == ["c.jsonl", "a.jsonl", "b.jsonl"]
    finally:
        intake.stop()
    intake = make_intake(layout)  # a restarted daemon continues the numbering
    try:
        drop(layout.inbox, "later.jsonl")
        assert [(j.id, j.original_name) for j in poll_for(intake, 1)] == [(4, "later.jsonl")]
    finally:
        intake.stop()
    assert [j.id for j, _ in Spool(layout).list(JobStatus.PENDING)] == [1, 2, 3, 4]


def test_a_file_still_being_written_is_not_taken(layout, intake):
    path = layout.inbox / "growing.jsonl"
    chunks = [f'{{"text": "line {i}"}}\n'.encode() for i in range(12)]
    with open(path, "wb") as f:
        for chunk in chunks:  # 0.6 s of writing with pauses shorter than the settle time
            f.write(chunk)
            f.flush()
            assert intake.poll(0.05) == []
    jobs = poll_for(intake, 1)
    assert len(jobs) == 1
    data = b"".join(chunks)
    assert jobs[0].sha256 == hashlib.sha256(data).hexdigest() and jobs[0].size == len(data)
    assert (Spool(layout).job_dir(jobs[0]) / "input.jsonl").read_bytes() == data


def test_partial_and_hidden_names_wait_for_their_final_name(layout, intake):
    for name in ["upload.jsonl.tmp", "upload2.jsonl.part", ".hidden.jsonl"]:
        (layout.inbox / name).write_text("x\n")
    (layout.inbox / "alpha").mkdir()
    (layout.inbox / "alpha" / "in-folder.part").write_text("y\n")
    assert poll_for_a_while(intake, 0.6) == []
    os.rename(layout.inbox / "upload2.jsonl.part", layout.inbox / "upload2.jsonl")
    os.rename(layout.inbox / "alpha" / "in-folder.part", layout.inbox / "alpha" / "in-folder.jsonl")
    jobs = poll_for(intake, 2)
    assert sorted((j.original_name, j.adapter) for j in jobs) == [("in-folder.jsonl", "alpha"),
                                                                   ("upload2.jsonl", "default")]
    assert sorted(p.name for p in layout.inbox.iterdir()) == [".hidden.jsonl", "alpha", "upload.jsonl.tmp"]


def test_adapter_folders_and_deeper_nesting(layout, intake):
    drop(layout.inbox / "alpha", "a.jsonl")
    drop(layout.inbox / "beta.v2", "b.jsonl", b"other\n")
    drop(layout.inbox / "alpha" / "deeper", "ignored.jsonl", b"deep\n")
    jobs = poll_for(intake, 2)
    assert sorted((j.adapter, j.original_name) for j in jobs) == [("alpha", "a.jsonl"), ("beta.v2", "b.jsonl")]
    poll_for_a_while(intake, 0.6)
    assert (layout.inbox / "alpha" / "deeper" / "ignored.jsonl").exists()
    nested = [e for e in events(layout, "file_rejected") if e.get("reason") == "nested_folder"]
    assert len(nested) == 1 and "alpha/deeper/ is not followed" in nested[0]["message"]


def test_bad_adapter_folder_names_are_reported_once_and_not_followed(layout, intake):
    for folder in [".hidden", "bad name", "-dash"]:
        drop(layout.inbox / folder, "data.jsonl")
    assert poll_for_a_while(intake, 0.6) == []
    bad = [e for e in events(layout, "file_rejected") if e.get("reason") == "bad_adapter_folder"]
    assert sorted(os.path.basename(e["path"]) for e in bad) == ["-dash", ".hidden", "bad name"]
    assert all("invalid adapter name" in e["message"] for e in bad)
    assert all((layout.inbox / f / "data.jsonl").exists() for f in [".hidden", "bad name", "-dash"])


def test_a_symlink_is_rejected_and_its_target_left_alone(layout, intake, tmp_path):
    target = tmp_path / "outside.jsonl"
    target.write_text('{"text": "secret"}\n')
    os.utime(target, (1_000_000_000, 1_000_000_000))  # atime too: any read would move it (strictatime aside)
    (tmp_path / "dir").mkdir()
    os.symlink(target, layout.inbox / "link.jsonl")
    os.symlink(tmp_path / "dir", layout.inbox / "dirlink")
    jobs = poll_for(intake, 2)
    assert {j.state for j in jobs} == {JobStatus.FAILED}
    errors = sorted(j.error for j in jobs)
    assert errors == [f"symlinks are not followed: dirlink -> {tmp_path / 'dir'}",
                      f"symlinks are not followed: link.jsonl -> {target}"]
    assert target.read_text() == '{"text": "secret"}\n' and os.stat(target).st_mtime == 1_000_000_000
    for job in jobs:
        assert os.path.islink(layout.state_dir("failed") / job.dir_name / "input.symlink")
    assert [e["reason"] for e in events(layout, "file_rejected")] == ["symlink", "symlink"]
    assert list(layout.inbox.iterdir()) == []


def test_a_fifo_is_skipped_without_blocking(layout, intake):
    fifo = layout.inbox / "pipe.jsonl"
    os.mkfifo(fifo)
    drop(layout.inbox, "real.jsonl")
    started = time.monotonic()
    jobs = poll_for(intake, 1)
    jobs += poll_for_a_while(intake, 0.6)
    assert time.monotonic() - started < 3  # nothing opened the FIFO (that would hang without a writer)
    assert [j.original_name for j in jobs] == ["real.jsonl"]
    special = [e for e in events(layout, "file_rejected") if e.get("reason") == "special_file"]
    assert len(special) == 1 and "it is a FIFO" in special[0]["message"]
    assert fifo.exists()


def test_names_with_spaces_unicode_and_newlines(layout, intake):
    names = ["with space.jsonl", "ünïcødé 日本.jsonl", "new\nline.jsonl", "tab\there.jsonl"]
    for i, name in enumerate(names):
        drop(layout.inbox, name, f"{i}\n".encode())
    jobs = poll_for(intake, len(names))
    assert sorted(j.original_name for j in jobs) == sorted(names)
    for job in jobs:
        assert Spool(layout).get(job.id)[0].original_name == job.original_name
    log = layout.status_log.read_text().splitlines()
    assert any("new\\nline.jsonl" in line for line in log)  # escaped: one event, one line
    assert len(log) == len(events(layout))


def test_the_same_name_dropped_twice_is_two_jobs(layout, intake):
    drop(layout.inbox, "data.jsonl", b"version one\n")
    (first,) = poll_for(intake, 1)
    drop(layout.inbox, "data.jsonl", b"version two\n")
    (second,) = poll_for(intake, 1)
    spool = Spool(layout)
    assert (first.id, second.id) == (1, 2) and first.original_name == second.original_name == "data.jsonl"
    assert (spool.job_dir(first) / "input.jsonl").read_bytes() == b"version one\n"
    assert (spool.job_dir(second) / "input.jsonl").read_bytes() == b"version two\n"


def test_scan_inbox_alone_sees_every_complete_file_with_no_settle(layout):
    drop(layout.inbox, "a.jsonl")
    drop(layout.inbox / "beta", "b.jsonl")
    (layout.inbox / "c.jsonl.part").write_text("partial")
    found = scan_inbox(layout, 0, [".tmp", ".part"])
    assert sorted((c.adapter, c.original_name) for c in found) == [("beta", "b.jsonl"), ("default", "a.jsonl")]
    assert scan_inbox(layout, 0.2, [".part"]) == []  # a first look cannot know that a file has settled


def test_a_claim_error_is_logged_once_and_the_file_stays(layout, intake, monkeypatch):
    from daemon.supervisor import spool as spool_module

    real = spool_module._hash_and_sync
    calls = []

    def io_error(path, chunk=0):  # a fault we cannot cause for real: the disk fails while hashing
        calls.append(path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_hash_and_sync", io_error)
    stuck = drop(layout.inbox, "stuck.jsonl", b"keep me\n")
    assert poll_for_a_while(intake, 0.6) == []
    failed = [e for e in events(layout, "file_rejected") if e.get("reason") == "claim_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error" and "Input/output error" in failed[0]["message"]
    assert stuck.read_bytes() == b"keep me\n" and len(calls) == 1  # given back, and not hammered
    monkeypatch.setattr(spool_module, "_hash_and_sync", real)
    stuck.write_bytes(b"keep me too\n")  # a changed file is tried again at once
    assert [j.original_name for j in poll_for(intake, 1)] == ["stuck.jsonl"]


def test_a_hard_linked_file_becomes_a_private_copy(layout, intake, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"claimed bytes\n")
    layout.inbox.mkdir(parents=True, exist_ok=True)
    os.link(outside, layout.inbox / "linked.jsonl")
    (job,) = poll_for(intake, 1)
    outside.write_bytes(b"edited later, through the twin\n")
    stored = Spool(layout).job_dir(job) / "input.jsonl"
    assert stored.read_bytes() == b"claimed bytes\n" and os.stat(stored).st_nlink == 1
    assert job.sha256 == hashlib.sha256(b"claimed bytes\n").hexdigest()
    assert outside.read_bytes() == b"edited later, through the twin\n"  # the twin keeps its own bytes


def test_a_file_that_changed_after_it_settled_is_put_back(layout):
    from daemon.supervisor.claimed_input import StillChanging

    src = drop(layout.inbox, "growing.jsonl", b"first part\n")
    st = src.stat()
    with pytest.raises(StillChanging, match="changed after it settled"):
        Spool(layout).claim(src, "default", "growing.jsonl", settled=(st.st_size - 1, st.st_mtime_ns))
    assert src.read_bytes() == b"first part\n"  # back in the inbox, to settle again
    assert not list(layout.queue.glob("*/*"))
