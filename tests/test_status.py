"""status.log / events.jsonl / status.json: levels, rotation, journald echo, never raising."""

from __future__ import annotations

import json
import os
import signal

import pytest

from daemon.paths import Layout
from daemon.supervisor.status import StatusWriter


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def open_files() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.fixture
def layout(root):
    return Layout.at(root).ensure()


def test_event_writes_a_log_line_and_a_json_record(layout, capsys):
    w = StatusWriter(layout)
    w.event("job_failed", "job 3 failed: boom\nTraceback (most recent call last):\r\n  x", level="error",
            job_id=3, error="boom")
    (log_line,) = lines(layout.status_log)
    assert log_line.endswith("ERROR job 3 failed: boom | Traceback (most recent call last): | x")
    (record,) = [json.loads(x) for x in lines(layout.events)]
    assert record["event"] == "job_failed" and record["job_id"] == 3 and record["level"] == "error"
    assert record["message"].startswith("job 3 failed: boom\n")  # machines get it unabridged
    assert capsys.readouterr().out.strip() == log_line


def test_debug_is_filtered_by_the_level_setting(layout, monkeypatch):
    w = StatusWriter(layout, echo=False)
    w.event("phase", "job 1: loading", level="debug")
    w.event("job_started", "job 1 started")
    assert [x.split(" ", 1)[1] for x in lines(layout.status_log)] == ["INFO  job 1 started"]
    assert len(lines(layout.events)) == 1

    monkeypatch.setenv("TRAINING_DAEMON_LOG_LEVEL", "debug")
    StatusWriter(layout, echo=False).event("phase", "job 1: saving", level="debug")
    assert lines(layout.status_log)[-1].endswith("DEBUG job 1: saving")

    quiet = StatusWriter(layout, echo=False, level="warn")
    quiet.event("job_started", "not shown")
    quiet.event("disk_low", "shown", level="warning")
    assert lines(layout.status_log)[-1].endswith("WARNING shown") and "not shown" not in layout.status_log.read_text()
    with pytest.raises(ValueError, match="unknown log level"):
        StatusWriter(layout, level="loud")


def test_rotation_by_rename_starts_a_new_file(layout):
    w = StatusWriter(layout, echo=False)
    w.event("file_seen", "one")
    os.rename(layout.status_log, layout.root / "status.log.1")
    os.rename(layout.events, layout.root / "events.jsonl.1")
    w.event("file_seen", "two")
    assert [x.split("INFO  ")[1] for x in lines(layout.status_log)] == ["two"]
    assert [x.split("INFO  ")[1] for x in lines(layout.root / "status.log.1")] == ["one"]
    assert [json.loads(x)["message"] for x in lines(layout.events)] == ["two"]
    # The rotated files are let go of, so logrotate's compress/delete frees the space.
    held = open_files()
    assert str(layout.root / "status.log.1") not in held and str(layout.root / "events.jsonl.1") not in held


def test_deleted_log_is_recreated(layout):
    w = StatusWriter(layout, echo=False)
    w.event("a", "one")
    layout.status_log.unlink()
    w.event("a", "two")
    assert len(lines(layout.status_log)) == 1
    assert not any(p.startswith(str(layout.root)) and p.endswith("(deleted)") for p in open_files())


def test_sighup_reopen_after_logrotate(layout):
    """logrotate's sequence: rename, then postrotate sends SIGHUP; the daemon's handler calls reopen()."""
    w = StatusWriter(layout, echo=False)
    w.event("a", "one")
    old = signal.signal(signal.SIGHUP, lambda *_: w.reopen())
    try:
        os.rename(layout.status_log, layout.root / "status.log.1")
        os.kill(os.getpid(), signal.SIGHUP)
        assert w._reopen  # only a flag in the handler: safe even if it interrupted a write
        w.event("a", "two")
        assert not w._reopen
        assert lines(layout.status_log)[-1].endswith("two") and len(lines(layout.status_log)) == 1
        assert str(layout.root / "status.log.1") not in open_files()
        os.kill(os.getpid(), signal.SIGHUP)  # a reload with nothing rotated loses nothing
        w.event("a", "three")
        assert [x.rsplit(" ", 1)[1] for x in lines(layout.status_log)] == ["two", "three"]
    finally:
        signal.signal(signal.SIGHUP, old)


def test_journal_gets_priority_prefixes_and_no_progress_flood(layout, capfd, monkeypatch):
    st = os.fstat(1)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    w = StatusWriter(layout, echo_progress_seconds=3600)
    w.event("disk_low", "only 10 MiB free", level="error")
    for step in range(1, 51):
        w.event("progress", f"job 1 step {step}/50 loss 1.0", job_id=1, step=step, total_steps=50)
    out = capfd.readouterr().out.splitlines()
    assert out == ["<3>only 10 MiB free", "<6>job 1 step 1/50 loss 1.0", "<6>job 1 step 50/50 loss 1.0"]
    assert len([x for x in lines(layout.status_log) if "step" in x]) == 50  # the file keeps every one
    assert not any("\r" in x for x in out)


def test_full_disk_never_raises(layout, capfd):
    layout.status_log.symlink_to("/dev/full")
    w = StatusWriter(layout, echo=False)
    w.event("a", "one")
    w.event("a", "two")
    err = capfd.readouterr().err
    assert err.count("cannot write") == 1 and "No space left" in err
    assert [json.loads(x)["message"] for x in lines(layout.events)] == ["one", "two"]


def test_snapshot_is_atomic_json_with_timestamps(layout):
    w = StatusWriter(layout, echo=False)
    assert w.snapshot({"daemon": {"state": "idle"}, "current": None, "queue": {"pending": 0}})
    snap = json.loads(layout.status_json.read_text())
    assert snap["daemon"]["state"] == "idle" and snap["updated_unix"] > 0 and "updated_at" in snap
    assert not [p for p in layout.root.iterdir() if p.name.endswith(".tmp")]


def test_the_configs_log_level_filters_the_daemons_log(root, tiny_model_dir):
    from helpers import cli, drop, write_config

    config = write_config(root, tiny_model_dir, status={"log_level": "warning", "web": {"enabled": False}})
    drop(root, "broken.jsonl", b'{"messages": [\n')
    result = cli(root, "run", "--once", "--config", str(config), TRAINING_DAEMON_LOG_LEVEL=None)
    assert result.returncode != 0
    levels = {line.split()[1] for line in lines(root / "status.log")}
    assert levels and levels <= {"WARNING", "ERROR"}, levels
    failed = [line for line in lines(root / "status.log") if " ERROR " in line]
    assert any("broken.jsonl" in line or "job 1" in line for line in failed), failed
    assert any("invalid_json x1 (first: line 1)" in line for line in failed), failed


def test_a_line_shows_control_characters_escaped_and_the_json_keeps_them(layout, capsys):
    name = "x\x1b]0;pwned\x07\x1b[31mRED\u202e.jsonl"
    StatusWriter(layout, echo=True).event("job_started", f"job 1 started: {name}", file=name)
    log = layout.status_log.read_text()
    assert "job 1 started: x\\x1b]0;pwned\\x07\\x1b[31mRED\\u202e.jsonl" in log
    assert "\x1b" not in log and "\x1b" not in capsys.readouterr().out
    record = json.loads(layout.events.read_text())
    assert record["file"] == name and record["message"].endswith(name)


def test_journal_thins_progress_per_job_when_jobs_train_side_by_side(layout, capfd, monkeypatch):
    """Two jobs' progress lines interleave: each job gets its first and last line, not one per step."""
    st = os.fstat(1)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    w = StatusWriter(layout, echo_progress_seconds=3600)
    for step in range(1, 21):
        for job in (7, 8):
            w.event("progress", f"job {job} step {step}/20", job_id=job, step=step, total_steps=20)
    assert capfd.readouterr().out.splitlines() == ["<6>job 7 step 1/20", "<6>job 8 step 1/20", "<6>job 7 step 20/20",
                                                   "<6>job 8 step 20/20"]


def two_running() -> list[dict]:
    return [{"job_id": 7, "adapter": "a", "file": "a.jsonl", "phase": "training", "step": 40, "total_steps": 100,
             "loss": 0.5, "eta_s": 60},
            {"job_id": 8, "adapter": "b", "file": "b.jsonl", "phase": "loading"}]


def test_status_line_names_every_running_job():
    from daemon.supervisor.status_line import status_line

    running = two_running()
    assert status_line("training", running[0], running=running) == \
        "training 2 jobs: job 7 (a) step 40/100, job 8 (b) loading"
    running[1].update(phase="training", step=3, total_steps=None, saving_step=None)
    running[0]["saving_step"] = 40
    assert status_line("training", running[0], running=running) == \
        "training 2 jobs: job 7 (a) saving step 40, job 8 (b) step 3/?"
    many = [{"job_id": n, "adapter": f"x{n}", "phase": "starting"} for n in range(1, 7)]
    assert status_line("training", many[0], running=many) == ("training 6 jobs: job 1 (x1) starting, job 2 (x2) "
                                                              "starting, job 3 (x3) starting, job 4 (x4) starting, "
                                                              "2 more")
    # One job: the wording it always had, whether the caller passes `running` or not.
    one = two_running()[:1]
    assert status_line("training", one[0], running=one) == status_line("training", one[0])
    assert status_line("training", one[0]).startswith("training job 7 (a): [")
    assert status_line("idle", None, running=[], inbox="/r/inbox") == "idle: watching /r/inbox"


def test_status_command_shows_every_running_job(root):
    """`training-daemon status` and `status --json` on a status.json of a daemon training two jobs."""
    from helpers import cli

    layout = Layout.at(root).ensure()
    running = [{**two_running()[0], "devices": ["0"], "slot": "gpu0", "executor": "local"},
               {**two_running()[1], "devices": None, "slot": "slurm", "executor": "slurm", "slurm_job_id": "4501"}]
    StatusWriter(layout, echo=False).snapshot({"daemon": {"state": "training", "parallel": {"running": 2, "max": 2}},
                                               "running": running, "current": running[0]})
    shown = cli(root, "status")
    assert shown.returncode == 0, shown.stderr
    assert "#7  a.jsonl -> adapter a  (training)  on GPU 0" in shown.stdout
    assert "#8  b.jsonl -> adapter b  (loading)  on Slurm job 4501" in shown.stdout
    assert "2 jobs (at most 2 at a time)" in shown.stdout
    as_json = cli(root, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["running"] == running
