"""The queue on disk: ids, crash-safe claims, moves, lookups and the startup sweep."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from daemon.supervisor import spool as spool_module
from daemon.supervisor.job import Job, JobStatus
from daemon.paths import Layout
from daemon.supervisor.spool import RESTART_REASON, Spool


@pytest.fixture
def layout(root):
    """A root as the daemon leaves it at start: its folders and the spool's queue/<state>/ folders."""
    layout = Layout.at(root).ensure()
    Spool(layout).make_folders()
    return layout


def drop(layout, name, data: bytes = b'{"text": "hi"}\n', folder=None):
    path = (folder or layout.inbox) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def claim(spool, layout, name, data=b'{"text": "hi"}\n', adapter="default", **kw):
    return spool.claim(drop(layout, name, data), adapter, name, **kw)


def tree(layout):
    return sorted(str(p.relative_to(layout.queue)) for p in layout.queue.rglob("*"))


def test_claim_moves_the_bytes_unchanged_and_writes_a_manifest(layout):
    data = b'{"text": "caf\xc3\xa9"}\n' * 1000 + b"no newline at the end"
    job = claim(Spool(layout), layout, "data.jsonl", data, adapter="mine")
    job_dir = layout.state_dir("pending") / "j000001"
    assert (job_dir / "input.jsonl").read_bytes() == data
    assert not (layout.inbox / "data.jsonl").exists()
    on_disk = json.loads((job_dir / "job.json").read_text())
    assert on_disk["id"] == job.id == 1 and on_disk["state"] == "pending" and on_disk["adapter"] == "mine"
    assert on_disk["sha256"] == hashlib.sha256(data).hexdigest() and on_disk["size"] == len(data)
    assert on_disk["original_name"] == "data.jsonl" and on_disk["queued_at"] and on_disk["attempts"] == []
    assert Job.load(job_dir) == job
    assert tree(layout) == ["done", "failed", "pending", "pending/j000001", "pending/j000001/input.jsonl",
                            "pending/j000001/job.json", "running"]


def test_ids_persist_across_spools_and_are_never_reused(layout):
    assert [claim(Spool(layout), layout, f"{n}.jsonl", f"{n}\n".encode()).id for n in range(3)] == [1, 2, 3]
    Spool(layout).next_id()  # handed out, then the daemon died before using it: 4 is gone for good
    assert claim(Spool(layout), layout, "x.jsonl").id == 5
    layout.counter.unlink()  # a lost counter file: the job folders still bound the next id
    assert claim(Spool(layout), layout, "y.jsonl").id == 6
    layout.counter.write_text("garbage")
    assert Spool(layout).next_id() == 7
    assert [j.id for j, _ in Spool(layout).list()] == [1, 2, 3, 5, 6]


def test_a_vanished_file_leaves_nothing_behind(layout):
    assert Spool(layout).claim(layout.inbox / "gone.jsonl", "default", "gone.jsonl") is None
    assert tree(layout) == ["done", "failed", "pending", "running"]


def test_the_same_name_twice_makes_two_jobs_and_overwrites_nothing(layout):
    spool = Spool(layout)
    first = claim(spool, layout, "same.jsonl", b"first\n")
    second = claim(spool, layout, "same.jsonl", b"second\n")
    assert (first.id, second.id) == (1, 2)
    assert [(spool.job_dir(j) / "input.jsonl").read_bytes() for j in (first, second)] == [b"first\n", b"second\n"]


def test_a_symlink_becomes_a_failed_job_holding_the_link_unread(layout, tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("do not read me")
    before = os.stat(target)
    os.symlink(target, layout.inbox / "link.jsonl")
    job = Spool(layout).claim(layout.inbox / "link.jsonl", "default", "link.jsonl")
    assert job.state == JobStatus.FAILED and job.sha256 is None
    assert job.error == f"symlinks are not followed: link.jsonl -> {target}"
    job_dir = layout.state_dir("failed") / "j000001"
    assert os.readlink(job_dir / "input.symlink") == str(target) and not (job_dir / "input.jsonl").exists()
    after = os.stat(target)
    assert target.read_text() == "do not read me" and (after.st_atime_ns, after.st_mtime_ns) == (
        before.st_atime_ns, before.st_mtime_ns)


def test_duplicates_skip_goes_straight_to_done(layout):
    spool = Spool(layout)
    original = claim(spool, layout, "a.jsonl", b"same\n")
    waiting = claim(spool, layout, "w.jsonl", b"same\n", duplicates="skip")  # the original has not trained yet
    assert waiting.state == JobStatus.PENDING and waiting.duplicate_of == original.id
    spool.move(original, JobStatus.DONE)
    dup = claim(spool, layout, "b.jsonl", b"same\n", duplicates="skip")
    other_adapter = claim(spool, layout, "c.jsonl", b"same\n", adapter="other", duplicates="skip")
    trained_again = claim(spool, layout, "d.jsonl", b"same\n", duplicates="train")
    assert dup.state == JobStatus.DONE and dup.duplicate_of == original.id
    assert dup.note == f"duplicate of job {original.id} (same sha256); not trained again"
    assert (layout.state_dir("done") / dup.dir_name / "input.jsonl").read_bytes() == b"same\n"
    assert other_adapter.state == trained_again.state == JobStatus.PENDING
    assert other_adapter.duplicate_of is None and trained_again.duplicate_of is None


def test_find_by_sha256_looks_at_done_pending_running_only(layout):
    spool = Spool(layout)
    jobs = [claim(spool, layout, f"{n}.jsonl", b"bytes\n", duplicates="train") for n in range(3)]
    sha = jobs[0].sha256
    assert spool.find_by_sha256(sha, "default").id == 1  # the earliest
    assert spool.find_by_sha256(sha, "other") is None and spool.find_by_sha256("0" * 64, "default") is None
    spool.move(jobs[0], JobStatus.FAILED)
    spool.move(jobs[1], JobStatus.RUNNING)
    assert spool.find_by_sha256(sha, "default").id == 2
    assert Spool(layout).find_by_sha256(sha, "default").id == 2  # a fresh spool reads it from disk


def test_move_list_get_and_the_folder_is_the_truth(layout):
    spool = Spool(layout)
    a, b, c = (claim(spool, layout, f"{n}.jsonl", f"{n}\n".encode()) for n in "abc")
    assert spool.move(b, JobStatus.RUNNING) == layout.state_dir("running") / "j000002"
    b.error = "boom"
    spool.move(b, "failed")
    spool.move(c, JobStatus.DONE)
    assert [(j.id, j.state.value) for j, _ in spool.list()] == [(1, "pending"), (2, "failed"), (3, "done")]
    assert [j.id for j, _ in spool.list("failed")] == [2] and spool.count(JobStatus.FAILED) == 1
    job, path = spool.get(2)
    assert job.error == "boom" and path == layout.state_dir("failed") / "j000002"
    assert json.loads((path / "job.json").read_text())["state"] == "failed"
    assert spool.get(99) is None
    # A crash between job.json and the rename: the manifest says done, the folder says pending.
    manifest = layout.state_dir("pending") / "j000001" / "job.json"
    manifest.write_text(manifest.read_text().replace('"pending"', '"done"'))
    assert spool.get(1)[0].state == JobStatus.PENDING
    # A stale Job object still moves the job from wherever its folder really is.
    stale = Job.load(layout.state_dir("pending") / "j000001")
    stale.state = JobStatus.RUNNING
    assert spool.move(stale, JobStatus.DONE) == layout.state_dir("done") / "j000001"
    assert f"{JobStatus.DONE}" == "done"


def test_list_ignores_strays_but_not_a_job_folder_without_a_manifest(layout):
    spool = Spool(layout)
    claim(spool, layout, "a.jsonl")
    (layout.state_dir("pending") / "notes.txt").write_text("hello")
    (layout.state_dir("pending") / "j000097").write_text("a file, not a job folder")
    (layout.state_dir("pending") / "j000099").mkdir()  # no manifest: a job all the same, shown as broken
    (layout.state_dir("pending") / ".claim-j000098").mkdir()
    assert [(j.id, j.unreadable) for j, _ in spool.list()] == [(1, None), (99, "job.json is missing")]
    assert spool.count("pending") == 3


@pytest.mark.parametrize("manifest, reason", [
    (b'{"id": 1, "adapter": "default", "original_na', "job.json is not valid JSON (Unterminated string"),
    (b"", "job.json is empty"),
    (b"\xff\xfe", "job.json is not valid JSON"),
    (b"[1, 2]", "job.json holds a JSON list, not an object"),
    (b'{"id": 1}', "job.json lacks adapter, original_name"),
    (b'{"id": "1", "adapter": "default", "original_name": "a.jsonl"}', "job.json has a wrong type for id ('1')"),
    (b'{"id": 1, "adapter": "default", "original_name": "a.jsonl", "attempts": {}}', "wrong type for attempts"),
    (b'{"id": 7, "adapter": "default", "original_name": "a.jsonl"}', "job.json is job 7's, but its folder is j000001"),
])
def test_a_manifest_that_cannot_be_read_is_listed_and_found_as_a_stand_in(layout, manifest, reason):
    spool = Spool(layout)
    claim(spool, layout, "a.jsonl")
    claim(spool, layout, "b.jsonl", b'{"text": "b"}\n')
    path = layout.state_dir("pending") / "j000001"
    (path / "job.json").write_bytes(manifest)
    listed = spool.list()
    assert [j.id for j, _ in listed] == [1, 2] and [j.id for j, _ in spool.list("pending")] == [1, 2]
    job, where = spool.get(1)
    assert where == path and job.state == JobStatus.PENDING and reason in job.unreadable
    assert listed[0][0] == job and job.to_dict()["unreadable"] == job.unreadable
    assert "unreadable" not in listed[1][0].to_dict()  # a readable job's dict is as it always was
    assert (job.adapter, job.original_name) == ("?", "?") and "the daemon sets this job aside" in job.error
    with pytest.raises(AssertionError):
        job.save(path)  # a stand-in's guesses never overwrite the manifest
    assert (path / "job.json").read_bytes() == manifest


def test_set_aside_rebuilds_what_is_unambiguous_and_keeps_the_bytes(layout):
    from daemon.supervisor.status import StatusWriter

    spool = Spool(layout)
    data = b'{"text": "mine"}\n'
    job = claim(spool, layout, "a.jsonl", data, adapter="mine")
    # The daemon's own record of taking the file, as intake writes it.
    StatusWriter(layout, echo=False).event("job_queued", "job 1 queued", job_id=1, adapter="mine", file="a.jsonl",
                                           sha256=job.sha256, size=job.size)
    other = claim(spool, layout, "b.jsonl", b'{"text": "b"}\n')
    spool.move(other, JobStatus.RUNNING)
    for folder in (layout.state_dir("pending") / "j000001", layout.state_dir("running") / "j000002"):
        (folder / "job.json").write_text('{"id": 1, "ada')
    rebuilt = [spool.set_aside(j) for j, _ in spool.list() if j.unreadable]
    assert [(j.id, j.state, j.adapter, j.original_name) for j in rebuilt] == [
        (1, JobStatus.FAILED, "mine", "a.jsonl"), (2, JobStatus.FAILED, "?", "?")]
    assert rebuilt[0].sha256 == job.sha256 and rebuilt[0].size == len(data)
    assert "job.json could not be read (job.json is not valid JSON" in rebuilt[0].error
    assert "`training-daemon retry 1` queues it again" in rebuilt[0].error
    assert "its adapter and file name are unknown: drop j000002/input.jsonl into the inbox again" in rebuilt[1].error
    failed = layout.state_dir("failed") / "j000001"
    assert (failed / "input.jsonl").read_bytes() == data
    assert (failed / "job.json.unreadable").read_text() == '{"id": 1, "ada'
    assert Job.load(failed) == rebuilt[0] and [j.id for j, _ in spool.list("failed")] == [1, 2]
    assert not any(j.unreadable for j, _ in spool.list())


def test_a_job_seen_in_two_folders_mid_move_is_listed_once_in_the_later_state(layout):
    import shutil

    spool = Spool(layout)
    job = claim(spool, layout, "a.jsonl")
    # What a reader in another process can see while the daemon renames pending/j000001 to done/.
    shutil.copytree(layout.state_dir("pending") / job.dir_name, layout.state_dir("done") / job.dir_name)
    assert [(j.id, j.state) for j, _ in spool.list()] == [(1, JobStatus.DONE)]
    assert spool.ids("pending") == [1] and spool.ids("done") == [1] and spool.ids("failed") == []


def test_the_spool_makes_its_state_folders_on_a_bare_root(root):
    layout = Layout.at(root).ensure()
    assert sorted(p.name for p in layout.queue.iterdir()) == []  # the states are the spool's, not the layout's
    spool = Spool(layout)
    assert spool.list() == [] and spool.get(1) is None and spool.count("pending") == 0  # reading makes nothing
    assert sorted(p.name for p in layout.queue.iterdir()) == []
    job = claim(spool, layout, "a.jsonl")
    assert sorted(p.name for p in layout.queue.iterdir()) == ["done", "failed", "pending", "running"]
    assert spool.get(job.id)[1] == layout.state_dir("pending") / "j000001"


def test_sweep_finishes_half_made_claims(layout):
    spool = Spool(layout)
    pending = layout.state_dir("pending")
    # 1. crashed right after mkdir: the file is still in the inbox
    (pending / ".claim-j000001").mkdir()
    waiting = drop(layout, "waiting.jsonl", b"still here\n")
    # 2. manifest written, file not moved yet
    early = Job(id=2, adapter="alpha", original_name="early.jsonl")
    (pending / ".claim-j000002").mkdir()
    early.save(pending / ".claim-j000002")
    # 3. file moved in, not hashed yet
    moved = Job(id=3, adapter="beta", original_name="moved.jsonl", submitted_at="2024-01-01T00:00:00+00:00")
    (pending / ".claim-j000003").mkdir()
    moved.save(pending / ".claim-j000003")
    (pending / ".claim-j000003" / "input.jsonl").write_bytes(b"moved bytes\n")
    # 4. no manifest at all (made by hand): what can be recovered is the id and the bytes
    (pending / ".claim-j000004").mkdir()
    (pending / ".claim-j000004" / "input.jsonl").write_bytes(b"orphan\n")
    # 5. a symlink claim that crashed after the link was set aside
    (pending / ".claim-j000005").mkdir()
    Job(id=5, adapter="default", original_name="l.jsonl").save(pending / ".claim-j000005")
    os.symlink("/nowhere", pending / ".claim-j000005" / "input.symlink")

    lines = spool.sweep(max_attempts=3)
    assert len(lines) == 5
    assert not [p for p in layout.queue.rglob(".claim-*")]
    assert waiting.read_bytes() == b"still here\n"
    jobs = {j.id: j for j, _ in spool.list()}
    assert sorted(jobs) == [3, 4, 5]
    assert (jobs[3].adapter, jobs[3].original_name, jobs[3].state) == ("beta", "moved.jsonl", JobStatus.PENDING)
    assert jobs[3].sha256 == hashlib.sha256(b"moved bytes\n").hexdigest() and jobs[3].size == 12
    assert jobs[3].submitted_at == "2024-01-01T00:00:00+00:00"
    assert jobs[4].adapter == "default" and jobs[4].sha256 == hashlib.sha256(b"orphan\n").hexdigest()
    assert jobs[5].state == JobStatus.FAILED and "symlinks are not followed" in jobs[5].error
    assert spool.claim(waiting, "default", "waiting.jsonl").id == 6  # ids of half-made claims stay used


def test_a_claim_that_fails_half_way_gives_the_file_back(layout, monkeypatch):
    def disk_full(path, chunk=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_hash_and_sync", disk_full)  # a fault we cannot cause for real
    src = drop(layout, "keep.jsonl", b"precious\n")
    with pytest.raises(OSError):
        Spool(layout).claim(src, "default", "keep.jsonl")
    assert src.read_bytes() == b"precious\n"
    assert tree(layout) == ["done", "failed", "pending", "running"]


def start(spool, job):
    """What the daemon does when it starts a job: move it to running and open an attempt."""
    spool.move(job, JobStatus.RUNNING)
    job.attempts.append({"n": len(job.attempts) + 1, "started_at": "2024-01-01T00:00:00+00:00",
                         "micro_batch_size": 4})
    job.save(spool.job_dir(job))


def test_sweep_sends_running_jobs_back_with_a_reason(layout):
    spool = Spool(layout)
    a, b, c = (claim(spool, layout, f"{n}.jsonl", f"{n}\n".encode()) for n in "abc")
    start(spool, a)
    spool.move(b, JobStatus.RUNNING)  # died before the attempt was written down
    lines = Spool(layout).sweep(max_attempts=3)
    assert len(lines) == 2 and all("back to pending" in line and RESTART_REASON in line for line in lines)
    jobs = {j.id: j for j, _ in spool.list()}
    assert {j.state for j in jobs.values()} == {JobStatus.PENDING}
    attempt = jobs[1].attempts[0]
    assert attempt["outcome"] == "interrupted" and attempt["error"] == RESTART_REASON and attempt["ended_at"]
    assert attempt["started_at"] == "2024-01-01T00:00:00+00:00" and attempt["micro_batch_size"] == 4
    assert jobs[1].note == RESTART_REASON
    assert [a["outcome"] for a in jobs[2].attempts] == ["interrupted"]
    assert jobs[3].attempts == [] and Spool(layout).sweep(3) == []


def test_a_crash_loop_ends_in_failed_after_max_attempts(layout):
    spool = Spool(layout)
    job = claim(spool, layout, "loop.jsonl")
    start(spool, job)
    job.attempts[-1].update(outcome="failed", error="first: Traceback ...", ended_at="x")
    spool.move(job, JobStatus.PENDING)
    for _crash in range(2):
        job = spool.get(1)[0]
        start(spool, job)
        lines = spool.sweep(max_attempts=3)
    job, path = spool.get(1)
    assert path.parent.name == "failed" and job.state == JobStatus.FAILED and job.finished_at
    assert "failed: interrupted or failed 3 times (max_attempts=3)" in lines[0]
    assert job.error == f"attempt 1: first: Traceback ...\n\nattempt 2: {RESTART_REASON}\n\nattempt 3: {RESTART_REASON}"
    # A retry by the user starts the count again.
    job.attempts.append({"n": 4, "outcome": "retried_by_user"})
    spool.move(job, JobStatus.PENDING)
    start(spool, job)
    spool.sweep(max_attempts=3)
    assert spool.get(1)[0].state == JobStatus.PENDING


def test_spool_and_job_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, daemon.supervisor.spool, daemon.supervisor.job, daemon.supervisor.intake; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_an_unreadable_job_that_cannot_be_moved_is_reported_once_and_never_started(layout, monkeypatch):
    spool = Spool(layout)
    claim(spool, layout, "a.jsonl")
    claim(spool, layout, "b.jsonl", b'{"text": "b"}\n')
    (layout.state_dir("pending") / "j000001" / "job.json").write_text("nope")

    def read_only(job):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(spool, "set_aside", read_only)
    readable, reported = spool.set_aside_unreadable(spool.list("pending"))
    assert [j.id for j, _ in readable] == [2]
    assert [(j.id, j.state) for j in reported] == [(1, JobStatus.PENDING)]
    assert "cannot be moved to queue/failed/: [Errno 30] Read-only file system" in reported[0].error
    readable, reported = spool.set_aside_unreadable(spool.list("pending"))
    assert [j.id for j, _ in readable] == [2] and reported == []  # said once, not at every turn of the loop
