"""The terminal views: status table, jobs table, `logs -f` through rotation, `submit --follow`."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest

from daemon import durable
from daemon.paths import Layout
from daemon.supervisor.console import (follow_job, follow_log, last_log_lines, progress_bar, render_jobs,
                                      render_status)
from daemon.supervisor.job import dir_name
from daemon.supervisor.spool import Spool
from daemon.supervisor.status import StatusWriter
from daemon.timefmt import fmt_duration

NOW = 1_700_000_000.0


def iso(unix: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


def training_status(**current) -> dict:
    cur = {"job_id": 42, "adapter": "support-bot", "file": "tickets.jsonl", "step": 50, "total_steps": 200,
           "epoch": 0.25, "loss": 1.23456, "eval_loss": 1.5, "lr": 2e-4, "tokens_per_s": 4567.0, "eta_s": 95,
           "gpu_mem_gib": 3.2, "started_at": iso(NOW - 600), "phase": "training", **current}
    return {"updated_at": iso(NOW - 1), "updated_unix": NOW - 1,
            "daemon": {"pid": 4242, "state": "training", "started_at": iso(NOW - 3700), "root": "/srv/td",
                       "version": "0.1.0"},
            "current": cur, "queue": {"pending": 2, "running": 1, "done": 10, "failed": 1},
            "gpu": {"name": "NVIDIA H100", "mem_used_gib": 12.3, "mem_total_gib": 80.0, "util_percent": 95.0}}


JOBS = [
    {"id": 40, "state": "done", "adapter": "default", "version": 3, "original_name": "a.jsonl",
     "finished_at": iso(NOW - 7200)},
    {"id": 41, "state": "failed", "adapter": "default", "original_name": "broken.jsonl", "finished_at": iso(NOW - 60),
     "error": "line 2: not valid JSON\nTraceback (most recent call last): ..."},
    {"id": 42, "state": "running", "adapter": "support-bot", "original_name": "tickets.jsonl",
     "started_at": iso(NOW - 600)},
]


def test_formatting_helpers():
    assert [fmt_duration(s) for s in (None, 0, 42, 185, 7380, 100000)] == ["?", "0s", "42s", "3m 05s", "2h 03m",
                                                                          "1d 03h"]
    assert progress_bar(50, 200, 20) == "[#####...............]  25%"
    assert progress_bar(5, None, 4) == "[????]"


def test_render_status_while_training():
    text = render_status(training_status(), JOBS, now=NOW)
    print("\n" + text)
    assert "training (pid 4242, version 0.1.0, up 1h 01m)" in text
    assert "#42  tickets.jsonl -> adapter support-bot  (training, started 10m 00s ago)" in text
    assert "[#######.......................]  25%  step 50/200  epoch 0.25" in text
    assert "1.2346  (eval 1.5000)  lr 2.00e-04" in text
    assert "4,567 tok/s  ETA 1:35  GPU memory 3.20 GiB" in text and "card peak" not in text  # no NVML reading
    on_card = render_status(training_status(gpu_peak_card_gib=4.1), JOBS, now=NOW)
    assert "GPU memory 3.20 GiB (card peak 4.10 GiB)" in on_card
    # the trainer counts whole epochs from 0, as it reports them; a person reads the first epoch as 1
    assert "step 50/200  epoch 1\n" in render_status(training_status(epoch=0), JOBS, now=NOW) + "\n"
    assert "2 pending  1 running  10 done  1 failed" in text
    assert "NVIDIA H100: 12.3 / 80.0 GiB, 95% busy" in text
    assert "line 2: not valid JSON" in text and "Traceback" not in text


def test_render_status_idle_stale_and_without_gpu():
    status = training_status()
    status.update(current=None, gpu=None, updated_unix=NOW - 300)
    status["daemon"]["state"] = "idle"
    text = render_status(status, [], now=NOW)
    assert "\njob     none\n" in text and "none visible" in text
    assert "status not updated for 5m 00s" in text
    status["daemon"]["running"] = False  # what the CLI adds when no daemon holds the lock
    assert "not running (last state idle, 5m 00s ago)" in render_status(status, [], now=NOW)
    assert "not running (no status.json yet)" in render_status({}, [], now=NOW)
    assert "not running (no status.json yet)" in render_status({"daemon": {"running": False}}, [], now=NOW)


def two_jobs_status() -> dict:
    """Jobs 42 (on GPUs 0 and 1) and 43 (a Slurm job, still loading) training side by side."""
    status = training_status(devices=["0", "1"], slot="gpu0,1", executor="local")
    second = {"job_id": 43, "adapter": "faq", "file": "faq.jsonl", "phase": "loading", "step": 0,
              "total_steps": None, "started_at": iso(NOW - 30), "executor": "slurm", "slurm_job_id": "9001",
              "slot": "slurm", "devices": None}
    status["running"] = [status["current"], second]
    status["daemon"]["parallel"] = {"running": 2, "max": 4}
    return status


def test_render_status_shows_a_block_per_running_job():
    text = render_status(two_jobs_status(), JOBS, now=NOW)
    print("\n" + text)
    lines = text.splitlines()
    assert "running   2 jobs (at most 4 at a time)" in lines
    jobs = [line for line in lines if line.startswith("job ")]
    assert jobs == ["job       #42  tickets.jsonl -> adapter support-bot  (training, started 10m 00s ago)  on GPU 0,1",
                    "job       #43  faq.jsonl -> adapter faq  (loading, started 30s ago)  on Slurm job 9001"]
    progress = [line for line in lines if line.startswith("progress ")]
    assert progress[0].endswith("25%  step 50/200  epoch 0.25") and progress[1].endswith("]  step 0/?")
    assert [line.split()[0] for line in lines[lines.index(jobs[1]):][:4]] == ["job", "progress", "loss", "speed"]
    # One job at a time (the daemon's `parallel.max` is 1, or an older daemon wrote no `running`): as before.
    single = training_status(devices=["0"], slot="gpu0", executor="local")
    single["daemon"]["parallel"] = {"running": 1, "max": 1}
    assert not [line for line in render_status(single, JOBS, now=NOW).splitlines() if line.startswith("running")]
    assert render_status(training_status(), JOBS, now=NOW).count("\njob ") == 1
    # A CPU slot; and nothing running while up to 4 may.
    cpu = training_status(slot="cpu1", devices=None, executor="local")
    assert "(training, started 10m 00s ago)  on slot cpu1" in render_status(cpu, JOBS, now=NOW)
    idle = two_jobs_status()
    idle.update(running=[], current=None)
    idle["daemon"].update(state="idle", parallel={"running": 0, "max": 4})
    assert "running  0 jobs (at most 4 at a time)\njob      none\n" in render_status(idle, [], now=NOW)


def test_render_jobs_table():
    text = render_jobs(JOBS, now=NOW)
    print("\n" + text)
    header, done, failed, running = text.splitlines()
    assert header.split() == ["ID", "STATE", "ADAPTER", "VERSION", "FILE", "WHEN", "NOTE"]
    assert done.split()[:5] == ["40", "done", "default", "v3", "a.jsonl"] and "2h 00m ago" in done
    assert failed.endswith("line 2: not valid JSON")
    assert running.split()[:4] == ["42", "running", "support-bot", "-"]
    assert render_jobs([]) == "no jobs"
    dup = {"id": 43, "state": "done", "adapter": "default", "original_name": "a copy.jsonl", "duplicate_of": 40,
           "version": 3, "queued_at": iso(NOW - 5)}
    assert render_jobs([dup], now=NOW).splitlines()[1].endswith("5s ago  same bytes as job 40")


def take_later(gen, n):
    """Start reading n lines from a follow_log generator in the background; call the result to get them."""
    out = []
    done = threading.Event()

    def run():
        for _ in range(n):
            out.append(next(gen))
        done.set()

    threading.Thread(target=run, daemon=True).start()

    def result(timeout=5.0):
        assert done.wait(timeout), f"only got {out}"
        return out

    return result


def take(gen, n, timeout=5.0):
    return take_later(gen, n)(timeout)


def test_follow_log_tails_then_follows_through_rotation(root):
    layout = Layout.at(root)
    w = StatusWriter(layout, echo=False)
    for i in range(30):
        w.event("e", f"old {i}")
    gen = follow_log(layout.status_log, lines=3, poll=0.02)
    assert [x.rsplit(" ", 1)[1] for x in take(gen, 3)] == ["27", "28", "29"]
    w.event("e", "live 1")
    assert take(gen, 1)[0].endswith("live 1")
    # logrotate: rename; a line still lands in the old file; then the writer starts a new one.
    os.rename(layout.status_log, root / "status.log.1")
    with open(root / "status.log.1", "a") as old:
        old.write("late line in the old file\n")
    w.event("e", "after rotation")
    got = take(gen, 2)
    assert got[0] == "late line in the old file" and got[1].endswith("after rotation")
    # truncation in place (copytruncate) restarts from the top
    pending = take_later(gen, 1)
    time.sleep(0.1)
    layout.status_log.write_text("")
    time.sleep(0.1)
    w.event("e", "after truncation")
    assert pending()[0].endswith("after truncation")


def test_follow_log_waits_for_a_file_that_does_not_exist_yet(root):
    gen = follow_log(root / "status.log", lines=5, poll=0.02)
    threading.Timer(0.2, lambda: (root / "status.log").write_text("first\nsecond\n")).start()
    assert take(gen, 2) == ["first", "second"]


def daemon_root(root) -> Layout:
    """A root as a running daemon keeps it: its folders and the spool's queue/<state>/ folders."""
    layout = Layout.at(root).ensure()
    Spool(layout).make_folders()
    return layout


def make_job(layout: Layout, job_id: int, state: str, **fields) -> None:
    d = layout.state_dir(state) / dir_name(job_id)
    d.mkdir(parents=True)
    durable.write_json(d / "job.json", {"id": job_id, "adapter": "default", "original_name": "f.jsonl",
                                        "state": state, **fields})


def move_job(layout: Layout, job_id: int, src: str, dst: str, **fields) -> None:
    d = layout.state_dir(src) / dir_name(job_id)
    job = json.loads((d / "job.json").read_text())
    durable.write_json(d / "job.json", {**job, "state": dst, **fields})
    durable.rename(d, layout.state_dir(dst) / d.name)


def follow_in_thread(layout, job_id, out):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", follow_job(layout, job_id, out, poll=0.02)),
                         daemon=True)
    t.start()
    return t, result


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_follow_job_shows_queue_progress_and_ends_done(root):
    layout = daemon_root(root)
    w = StatusWriter(layout, echo=False)
    make_job(layout, 1, "running")
    make_job(layout, 2, "pending")
    w.snapshot({"daemon": {"state": "training"}, "current": {"job_id": 1, "phase": "training", "step": 1,
                                                              "total_steps": 4}})
    out = TTY()
    t, result = follow_in_thread(layout, 2, out)
    time.sleep(0.2)
    move_job(layout, 1, "running", "done", version=1)
    move_job(layout, 2, "pending", "running")
    for step in (1, 2, 4):
        w.snapshot({"daemon": {"state": "training"},
                    "current": {"job_id": 2, "phase": "training", "step": step, "total_steps": 4, "loss": 2.0 / step,
                                "eta_s": 4 - step}})
        time.sleep(0.15)
    move_job(layout, 2, "running", "done", version=2)
    t.join(5)
    text = out.getvalue()
    print(text.replace("\r", "\n"))
    assert result["rc"] == 0
    assert "job 2 queued, next (job 1 is training)" in text
    assert "step 2/4  loss 1.0000" in text and "step 4/4" in text
    assert text.rstrip().endswith(f"job 2 done: adapter default v2 ({layout.checkpoints / 'default' / 'v2'})")
    assert "\r" in text  # a terminal gets one line redrawn in place


def test_follow_job_failed_returns_1_with_plain_lines_in_a_pipe(root):
    layout = daemon_root(root)
    make_job(layout, 5, "running")
    StatusWriter(layout, echo=False).snapshot({"daemon": {"state": "training"},
                                               "current": {"job_id": 5, "phase": "loading"}})
    out = io.StringIO()
    t, result = follow_in_thread(layout, 5, out)
    time.sleep(0.2)
    move_job(layout, 5, "running", "failed", error="line 3: no assistant turn\nmore detail")
    t.join(5)
    assert result["rc"] == 1
    assert out.getvalue().splitlines() == ["job 5 loading...", "job 5 failed: line 3: no assistant turn"]


def test_follow_job_finds_its_job_among_several_running(root):
    layout = daemon_root(root)
    make_job(layout, 1, "running")
    make_job(layout, 2, "running")
    make_job(layout, 3, "pending")
    w = StatusWriter(layout, echo=False)
    w.snapshot({"daemon": {"state": "training"},
                "running": [{"job_id": 1, "phase": "training", "step": 3, "total_steps": 10},
                            {"job_id": 2, "phase": "training", "step": 7, "total_steps": 8, "loss": 0.5}],
                "current": {"job_id": 1, "phase": "training", "step": 3, "total_steps": 10}})
    for job_id, expected in ((2, "job 2 [#####################...]  88%  step 7/8  loss 0.5000"),
                             (3, "job 3 queued, next (jobs 1, 2 are running)")):
        out = io.StringIO()
        t, result = follow_in_thread(layout, job_id, out)
        deadline = time.monotonic() + 5
        while not out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        move_job(layout, job_id, "running" if job_id == 2 else "pending", "failed", error="stopped by the test")
        t.join(5)
        assert out.getvalue().splitlines()[0].startswith(expected), out.getvalue()


@pytest.mark.parametrize("missing_timeout", [0.2])
def test_follow_job_gives_up_on_a_job_that_never_appears(root, missing_timeout):
    layout = daemon_root(root)
    out = io.StringIO()
    assert follow_job(layout, 99, out, poll=0.02, missing_timeout=missing_timeout) == 1
    assert "job 99: not found" in out.getvalue()


def test_names_and_errors_reach_the_terminal_escaped(tmp_path):
    jobs = [{"id": 1, "state": "failed", "adapter": "a", "original_name": "x\x1b[31mRED\n.jsonl",
             "error": "bad \u202egpj.jsonl\x9b"}]
    table = render_jobs(jobs, NOW)
    assert "x\\x1b[31mRED\\n.jsonl" in table and "bad \\u202egpj.jsonl\\x9b" in table
    assert not any(c in table for c in "\x1b\u202e\x9b")
    status = render_status({"current": {"job_id": 1, "file": "t\x07.jsonl", "adapter": "a"}}, jobs, NOW)
    assert "t\\x07.jsonl" in status and "\x07" not in status
    log = tmp_path / "status.log"
    log.write_bytes(b"plain\nwritten by someone else \x1b]0;title\x07\n")
    assert last_log_lines(log, 5) == ["plain", "written by someone else \\x1b]0;title\\x07"]
    assert last_log_lines(tmp_path / "none.log") == []
