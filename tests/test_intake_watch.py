"""The inbox's duplicates and its watch loop, through real files and a real watchdog observer: a duplicate waits for
its original, events bring files in before the settle time, a stopped observer or a deleted inbox is watched again,
the polling observer, poll's timing and thread safety. The rest of the inbox is tests/test_intake.py."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

import test_intake
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import Spool
from test_intake import drop, events, make_intake, poll_for

layout, intake = test_intake.layout, test_intake.intake  # the fixtures: a fresh layout, a started Intake on it


def write_in_place(folder, name, data: bytes = b'{"text": "hi"}\n'):
    """Write straight into the inbox and close: the "closed" event proves the watcher works. (A rename can reach
    watchdog as a lone "created" on a loaded machine, when it pairs the two halves of the move too late.)"""
    with open(folder / name, "wb") as f:
        f.write(data)
    return folder / name


@pytest.mark.parametrize("policy", ["skip", "train"])
def test_duplicate_policy(layout, policy):
    intake = make_intake(layout, duplicate_policy=policy)
    try:
        drop(layout.inbox, "first.jsonl", b"same bytes\n")
        (original,) = poll_for(intake, 1)
        drop(layout.inbox, "again.jsonl", b"same bytes\n")
        drop(layout.inbox / "other", "again.jsonl", b"same bytes\n")  # another adapter: never a duplicate
        jobs = sorted(poll_for(intake, 2), key=lambda j: j.adapter)
    finally:
        intake.stop()
    again, other = jobs
    assert other.adapter == "other" and other.state == JobStatus.PENDING and other.duplicate_of is None
    if policy == "skip":  # the original has not trained yet: the copy waits for its outcome
        assert again.state == JobStatus.PENDING and again.duplicate_of == original.id
        assert "skipped if that one succeeds" in events(layout, "job_queued")[1]["message"]
    else:
        assert again.state == JobStatus.PENDING and again.duplicate_of is None
        assert f"same bytes as job {original.id}" in events(layout, "job_queued")[1]["message"]


@pytest.mark.parametrize("outcome", [JobStatus.DONE, JobStatus.FAILED])
def test_a_duplicate_waits_for_its_original_and_trains_if_that_one_did_not(layout, outcome):
    intake = make_intake(layout, duplicate_policy="skip")
    spool = Spool(layout)
    try:
        drop(layout.inbox, "first.jsonl", b"same bytes\n")
        (original,) = poll_for(intake, 1)
        drop(layout.inbox, "again.jsonl", b"same bytes\n")
        (again,) = poll_for(intake, 1)
        assert intake.poll(0) == []  # the original is still pending: nothing is decided
        spool.move(original, outcome)  # what the daemon does once it trained it, or once it was cancelled
        settled = intake.poll(0)
    finally:
        intake.stop()
    job, folder = spool.get(again.id)
    if outcome == JobStatus.DONE:
        assert [j.id for j in settled] == [again.id] and folder.parent.name == "done"
        assert job.duplicate_of == original.id
        assert job.note == f"duplicate of job {original.id} (same sha256); not trained again"
        assert len(events(layout, "duplicate")) == 1
    else:
        assert settled == [] and folder.parent.name == "pending" and job.duplicate_of is None
        assert job.note == f"same bytes as job {original.id}, which failed or was cancelled: trained"


def test_a_done_original_makes_a_duplicate_done_at_once(layout):
    intake = make_intake(layout, duplicate_policy="skip")
    spool = Spool(layout)
    try:
        drop(layout.inbox, "first.jsonl", b"same bytes\n")
        (original,) = poll_for(intake, 1)
        spool.move(original, JobStatus.DONE)
        drop(layout.inbox, "again.jsonl", b"same bytes\n")
        (again,) = poll_for(intake, 1)
    finally:
        intake.stop()
    assert again.state == JobStatus.DONE and again.duplicate_of == original.id
    assert spool.get(again.id)[1].parent.name == "done"


def test_moved_in_and_closed_files_are_taken_on_the_event_before_the_settle_time(layout):
    intake = make_intake(layout, settle_seconds=30, rescan_seconds=30)
    try:
        intake.poll(0)  # the first scan
        started = time.monotonic()
        drop(layout.inbox, "moved.jsonl")  # a rename into the inbox
        assert [j.original_name for j in poll_for(intake, 1, timeout=5)] == ["moved.jsonl"]
        with open(layout.inbox / "written.jsonl", "wb") as f:  # written in place, then closed
            f.write(b"in place\n")
        assert [j.original_name for j in poll_for(intake, 1, timeout=5)] == ["written.jsonl"]
        assert time.monotonic() - started < 4
    finally:
        intake.stop()


def test_the_watcher_is_restarted_when_its_observer_stops(layout):
    intake = make_intake(layout, settle_seconds=30, rescan_seconds=30)  # only events can bring a file in fast
    try:
        intake.poll(0)
        assert intake.watcher.alive()
        dead = intake.watcher.observer
        dead.stop()
        dead.join(5)
        assert not intake.watcher.alive()
        assert intake.poll(0) == []
        assert intake.watcher.alive() and intake.watcher.observer is not dead
        assert len(events(layout, "watcher_restarted")) == 1
        write_in_place(layout.inbox, "after.jsonl")
        assert [j.original_name for j in poll_for(intake, 1, timeout=5)] == ["after.jsonl"]
    finally:
        intake.stop()
    assert not intake.watcher.alive()


def test_a_deleted_inbox_is_made_again_and_watched(layout):
    intake = make_intake(layout, settle_seconds=30, rescan_seconds=30)  # only events can bring a file in fast
    try:
        intake.poll(0)
        shutil.rmtree(layout.inbox)
        assert intake.poll(0.1) == []
        # The new inbox may get the old one's inode number (ext4), and the old watch may not have noticed the
        # deletion yet: one poll must still tell the folders apart and watch the new one.
        assert layout.inbox.is_dir() and intake.watcher.alive()
        assert len(events(layout, "watcher_restarted")) == 1
        write_in_place(layout.inbox, "back.jsonl")
        assert [j.original_name for j in poll_for(intake, 1)] == ["back.jsonl"]
    finally:
        intake.stop()


def test_an_adapter_folder_in_a_recreated_inbox_is_taken(layout, intake):
    intake.poll(0)
    shutil.rmtree(layout.inbox)
    assert intake.poll(0.1) == []
    drop(layout.inbox / "alpha", "back.jsonl")
    assert [j.adapter for j in poll_for(intake, 1)] == ["alpha"]


def test_the_polling_observer_works_too(layout):
    intake = make_intake(layout, polling=True)
    try:
        drop(layout.inbox, "polled.jsonl")
        assert [j.original_name for j in poll_for(intake, 1)] == ["polled.jsonl"]
    finally:
        intake.stop()


def test_poll_never_blocks_longer_than_asked(layout, intake):
    intake.poll(0)
    for timeout in (0.0, 0.2):
        started = time.monotonic()
        intake.poll(timeout)
        assert time.monotonic() - started < timeout + 0.15


def test_poll_is_safe_from_another_thread_writing_files(layout, intake):
    def writer():
        for i in range(20):
            drop(layout.inbox, f"f{i:02d}.jsonl", f"{i}\n".encode())
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    jobs = poll_for(intake, 20, timeout=8)
    thread.join()
    assert sorted(j.original_name for j in jobs) == [f"f{i:02d}.jsonl" for i in range(20)]
    assert [j.id for j in jobs] == list(range(1, 21))
