"""No gap between jobs: the next job's trainer prepares (imports, validation, tokenization) while a job trains,
waits at its GPU gate without the device locks, and trains only once the job before it has ended and its GPU
check was done (daemon/supervisor/standby.py). On the CPU with the tiny model: `trainer_prestart: true`.
Job 1 (several steps) is slowed at its second step (a fault hook's sleep) so that job 2 is seen waiting: the next
trainer is started once the job on the GPU has done its first step."""

from __future__ import annotations

import json
import os
import signal

import pytest

from accounting import trainer_pids
from helpers import chat_lines, cli, drop, events, jobs, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow

SLOW_FIRST_JOB = json.dumps([{"point": "train_step", "kind": "sleep", "seconds": 20, "job_id": 1, "step": 1}])


@pytest.fixture
def config(root, tiny_model_dir):
    return write_config(root, tiny_model_dir, trainer_prestart=True, limits={"max_attempts": 3, "min_free_disk_mb": 1},
                        status={"log_level": "debug", "web": {"enabled": False}})


def running(root) -> list[dict]:
    try:
        return json.loads((root / "status.json").read_text()).get("running") or []
    except (OSError, ValueError):
        return []


def waiting_job(root, job_id: int) -> dict | None:
    """Job `job_id` as status.json shows it, once its trainer said it waits for the GPU (validated) while
    another job trains."""
    if not [e for e in events(root, "phase") if e.get("job_id") == job_id and e.get("phase") == "waiting_for_gpu"]:
        return None
    rows = running(root)
    mine = [r for r in rows if r.get("job_id") == job_id and r.get("phase") == "waiting_for_gpu"]
    others = [r for r in rows if r.get("job_id") != job_id]
    return mine[0] if mine and others else None


def early_pid(root, job_id: int) -> int:
    (launch,) = [e for e in events(root, "launch") if e.get("job_id") == job_id and "pid" in e]
    return launch["pid"]


def lock_fds(pid: int) -> list[str]:
    """The trainer lock files a process has open (state/trainer-*.lock)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith("trainer-") and target.endswith(".lock"):
            out.append(target)
    return out


def index(rows: list[dict], kind: str, job_id: int) -> int:
    """Where the daemon logged `kind` for job `job_id` in events.jsonl (the order it saw things in)."""
    found = [i for i, e in enumerate(rows) if e["event"] == kind and e.get("job_id") == job_id]
    assert found, f"no {kind} event for job {job_id}"
    return found[0]


def test_the_next_job_prepares_while_one_trains_and_trains_once_the_gpu_is_free(root, config):
    daemon = start_daemon(root, "--config", str(config), TRAINING_DAEMON_FAULTS=SLOW_FIRST_JOB)
    try:
        wait_for(lambda: (root / "status.json").exists(), timeout=60, what="the daemon to start")
        drop(root, "first.jsonl", chat_lines(80, "a"))
        wait_for(lambda: any(r.get("job_id") == 1 for r in running(root)), timeout=60, what="job 1 to start")
        drop(root, "second.jsonl", chat_lines(8, "b"))
        shown = wait_for(lambda: waiting_job(root, 2), timeout=90, what="job 2 waiting for the GPU")
        assert shown["file"] == "second.jsonl"
        # prepared: validated and tokenized, report.json written, while job 1 still trains
        assert json.loads((root / "queue" / "running" / "j000002" / "report.json").read_text())["ok"]
        assert [j["folder"] for j in jobs(root)] == ["running", "running"]
        pid = early_pid(root, 2)
        assert lock_fds(pid) == []  # no device lock while it waits: job 1's trainer holds it
        assert lock_fds(early_pid(root, 1))  # job 1's trainer took it after its go
        status = cli(root, "status")
        assert "waiting_for_gpu" in status.stdout, status.stdout
        # one job trains, one is prepared: /metrics and status.json tell them apart
        parallel = wait_for(lambda: json.loads((root / "status.json").read_text())["daemon"]["parallel"],
                            timeout=10, what="status.json's daemon.parallel")
        assert (parallel["running"], parallel["prepared"]) == (1, 1), parallel
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done", "done"], timeout=180, what="both jobs done")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    rows = events(root)
    # validated before the job in front of it ended; trained only after that job's trainer exited and its GPU check
    assert index(rows, "validated", 2) < index(rows, "job_done", 1)
    assert index(rows, "job_done", 1) < index(rows, "gpu_memory", 1) < index(rows, "gpu_go", 2) \
        < index(rows, "first_step", 2)
    first = rows[index(rows, "first_step", 2)]  # how long the step took: when training began is known too
    assert first["seconds"] > 0 and f"first optimizer step done in {first['seconds']:.2f}s" in first["message"]
    phases = [e["phase"] for e in rows if e["event"] == "phase" and e.get("job_id") == 2]
    assert phases[:3] == ["validating", "waiting_for_gpu", "loading"], phases
    assert not any(e.get("cuda_initialized") for e in rows if e["event"] == "phase")
    # what depends on job 1 was decided after the go: job 2 trained on job 1's version
    done = {j["id"]: j for j in jobs(root)}
    meta2 = json.loads((root / "checkpoints" / "default" / f"v{done[2]['version']}" / "metadata.json").read_text())
    assert meta2["parent_version"] == done[1]["version"]
    assert len(done[2]["attempts"]) == 1 and done[2]["attempts"][0].get("go_at")
    assert trainer_pids(root) == []
    # the base was built in host memory while it waited, and the version says where the attempt's time went
    notes = [e["message"] for e in rows if e["event"] == "log" and e.get("job_id") == 2]
    assert any("built the base and its LoRA in host memory while waiting for the GPU" in m for m in notes), notes
    assert meta2["plan"]["lora_attached"] == "while waiting for the GPU"  # kept: the parent has this LoRA config
    order = ("validate wait_for_gpu early_load_rest standing_set parent_replay cuda_context memory_plan load_weights "
             "kernels lora to_device optimizer_resume first_step steps eval_split judge_new incumbent_load judge "
             "publish").split()
    said = next(m for m in notes if m.startswith("job 2: seconds: "))
    assert [lap.split()[0] for lap in said.removeprefix("job 2: seconds: ").split(", ")] == order, said
    laps = meta2["seconds"]
    assert set(laps) == set(order) - {"publish"}, laps  # the metadata is written before the publish ends
    assert laps["wait_for_gpu"] > laps["load_weights"]  # it waited while job 1 trained; the load was done by then


def test_a_bad_next_file_fails_while_the_first_still_trains(root, config):
    daemon = start_daemon(root, "--config", str(config), TRAINING_DAEMON_FAULTS=SLOW_FIRST_JOB)
    try:
        wait_for(lambda: (root / "status.json").exists(), timeout=60, what="the daemon to start")
        drop(root, "first.jsonl", chat_lines(80, "a"))
        wait_for(lambda: any(r.get("job_id") == 1 for r in running(root)), timeout=60, what="job 1 to start")
        drop(root, "broken.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}', "not json"])
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["running", "failed"], timeout=90,
                 what="job 2 to fail while job 1 trains")
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done", "failed"], timeout=180, what="job 1 done")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    failed = jobs(root)[1]
    assert len(failed["attempts"]) == 1 and "invalid_json" in failed["error"] + json.dumps(
        json.loads((root / "queue" / "failed" / "j000002" / "report.json").read_text()))
    rows = events(root)
    assert index(rows, "job_failed", 2) < index(rows, "job_done", 1)
    assert not [e for e in rows if e["event"] == "gpu_go" and e.get("job_id") == 2]  # never on the GPU
    assert not [e for e in rows if e["event"] == "job_retry"]


def _both_waiting(root, config):
    daemon = start_daemon(root, "--config", str(config), TRAINING_DAEMON_FAULTS=SLOW_FIRST_JOB)
    wait_for(lambda: (root / "status.json").exists(), timeout=60, what="the daemon to start")
    drop(root, "first.jsonl", chat_lines(80, "a"))
    wait_for(lambda: any(r.get("job_id") == 1 for r in running(root)), timeout=60, what="job 1 to start")
    drop(root, "second.jsonl", chat_lines(8, "b"))
    wait_for(lambda: waiting_job(root, 2), timeout=90, what="job 2 waiting for the GPU")
    return daemon


def _resumed_and_done_once(root, config):
    daemon = start_daemon(root, "--config", str(config), "--once")
    assert daemon.wait(240) == 0
    done = jobs(root)
    assert [j["folder"] for j in done] == ["done", "done"]
    assert [len([e for e in events(root, "job_done") if e["job_id"] == j["id"]]) for j in done] == [1, 1]
    versions = sorted(p.name for p in (root / "checkpoints" / "default").glob("v[0-9]*"))
    assert len(versions) == 2  # each file trained once: no version twice
    assert trainer_pids(root) == []
    return done


def test_a_warm_stop_while_the_next_job_waits_sends_both_back_and_both_finish_later(root, config):
    daemon = _both_waiting(root, config)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(120) == 0
    assert [j["folder"] for j in jobs(root)] == ["pending", "pending"]
    paused = {e["job_id"] for e in events(root, "job_paused")}
    assert paused == {1, 2}
    assert trainer_pids(root) == []
    _resumed_and_done_once(root, config)


def test_a_killed_daemon_with_one_job_training_and_one_waiting_resumes_both(root, config):
    daemon = _both_waiting(root, config)
    pids = [early_pid(root, 1), early_pid(root, 2)]
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    wait_for(lambda: not set(pids) & set(trainer_pids(root)), timeout=30, what="both trainers to exit with it")
    _resumed_and_done_once(root, config)
    sweep = [e["message"] for e in events(root, "sweep")]
    assert any("job 1" in m and "back to pending" in m for m in sweep), sweep
    assert any("job 2" in m and "back to pending" in m for m in sweep), sweep


def test_a_job_of_several_ranks_is_prepared_early_too(root, tiny_model_dir):
    # cpu_processes: 2 (gloo) stands for a multi-GPU job: the early trainer is two ranks, each prepares and waits
    # for its go; they join their process group only after it.
    config = write_config(root, tiny_model_dir, trainer_prestart=True, cpu_processes=2,
                          status={"log_level": "debug", "web": {"enabled": False}})
    daemon = _both_waiting(root, config)
    try:
        assert [j["folder"] for j in jobs(root)] == ["running", "running"]
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done", "done"], timeout=300, what="both jobs done")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    rows = events(root)
    assert index(rows, "validated", 2) < index(rows, "job_done", 1) < index(rows, "gpu_go", 2) \
        < index(rows, "first_step", 2)
    job_dir = root / "queue" / "done" / "j000002"
    assert (job_dir / "trainer-rank1.log").exists()  # rank 1 of the early trainer worked for this job
    assert "Traceback" not in (job_dir / "trainer.log").read_text() + (job_dir / "trainer-rank1.log").read_text()
    assert trainer_pids(root) == []
