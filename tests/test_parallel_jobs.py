"""Several jobs at once on one host (`max_parallel_jobs`, `gpus_per_job`): where jobs are placed, and what a user
sees when two train side by side on the CPU (two CPU slots, gloo) - both publish, each resumes on its own
after a crash or a warm stop, a cancel stops one job only.

The placement tests need no torch (daemon/supervisor/slots.py is pure). The daemon tests run the real
daemon on the tiny model with CUDA_VISIBLE_DEVICES="" (CPU slots on a GPU host too).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from accounting import Inbox, account, faults, resumes, trainer_pids
from daemon.supervisor import launch, slots
from daemon.supervisor.launch import Grant
from helpers import chat_lines, cli, events, jobs, start_daemon, wait_for, write_config

# --------------------------------------------------------------------------- placement rules (no torch)


def gpu_pool(n: int = 4, max_parallel: int | None = None) -> slots.Pool:
    return slots.Pool.of(tuple(str(i) for i in range(n)), cpu_processes=1, max_parallel=max_parallel)


def started(choices) -> list[tuple[int, str]]:
    return [(c.job_id, c.slot) for c in choices if isinstance(c, slots.Start)]


def test_one_gpu_per_job_fills_the_gpus_in_arrival_order():
    pending = [slots.Candidate(i, f"adapter{i}", 1) for i in (3, 1, 2)]
    choices = slots.next_jobs(pending, {}, gpu_pool(2))
    assert started(choices) == [(1, "gpu0"), (2, "gpu1")]  # job 3 waits for a free GPU
    assert choices[0].grant == Grant(1, ("0",))


def test_a_later_job_of_an_adapter_never_overtakes_an_earlier_one():
    pending = [slots.Candidate(2, "a", 1), slots.Candidate(3, "a", 1), slots.Candidate(4, "b", 1)]
    running = {1: slots.Taken("a", ("0",))}
    assert started(slots.next_jobs(pending, running, gpu_pool(4))) == [(4, "gpu1")]  # a's jobs wait for job 1
    assert started(slots.next_jobs(pending, {}, gpu_pool(4))) == [(2, "gpu0"), (4, "gpu1")]


def test_a_duplicate_waiting_for_its_original_is_not_started_and_holds_its_adapter():
    """Job 2 has job 1's bytes: intake decides once job 1 has ended (done: 2 is a duplicate; failed: 2 trains).
    Until then it must not start (it did, the moment job 1 ended), nor may adapter a's job 3 pass it."""
    pending = [slots.Candidate(2, "a", 1, held=True), slots.Candidate(3, "a", 1), slots.Candidate(4, "b", 1)]
    assert started(slots.next_jobs(pending, {}, gpu_pool(4))) == [(4, "gpu0")]


def test_a_job_that_does_not_fit_blocks_the_jobs_behind_it():
    pending = [slots.Candidate(2, "big", "all"), slots.Candidate(3, "small", 1)]
    running = {1: slots.Taken("x", ("0",))}
    assert slots.next_jobs(pending, running, gpu_pool(2)) == []  # no backfill: the big job is not starved
    (choice,) = slots.next_jobs(pending, {}, gpu_pool(2))  # the small job waits behind it
    assert (choice.slot, choice.grant) == ("gpu0,1", Grant(2, ("0", "1")))


def test_max_parallel_jobs_caps_the_running_jobs():
    pending = [slots.Candidate(i, f"a{i}", 1) for i in range(1, 5)]
    assert started(slots.next_jobs(pending, {}, gpu_pool(4, max_parallel=2))) == [(1, "gpu0"), (2, "gpu1")]
    running = {9: slots.Taken("x", ("2",))}
    assert started(slots.next_jobs(pending, running, gpu_pool(4, max_parallel=2))) == [(1, "gpu0")]


def test_without_gpus_each_job_takes_a_cpu_slot_of_cpu_processes():
    pool = slots.Pool.of(None, cpu_processes=2, max_parallel=2)
    assert slots.Pool.of(None, cpu_processes=2, max_parallel=None).units == ("cpu0",)  # one at a time by default
    pending = [slots.Candidate(1, "a", 1), slots.Candidate(2, "b", "all"), slots.Candidate(3, "c", 1)]
    choices = slots.next_jobs(pending, {}, pool)
    assert started(choices) == [(1, "cpu0"), (2, "cpu1")]
    assert choices[1].grant == Grant(2, None)
    assert started(slots.next_jobs(pending[2:], {1: slots.Taken("a", ("cpu0",))}, pool)) == [(3, "cpu1")]


def test_more_gpus_per_job_than_the_pool_fails_the_job_naming_the_key_and_the_count():
    pending = [slots.Candidate(1, "huge", 8), slots.Candidate(2, "b", 1)]
    choices = slots.next_jobs(pending, {}, gpu_pool(2))
    assert isinstance(choices[0], slots.Misfit) and choices[0].job_id == 1
    assert "gpus_per_job: 8 (adapter huge)" in choices[0].message and "2 GPU(s) (0, 1)" in choices[0].message
    assert started(choices) == [(2, "gpu0")]  # the misfit fails at once: it blocks nobody


def test_slurm_jobs_need_no_local_device_only_a_limit():
    pool = slots.Pool.of(None, cpu_processes=1, max_parallel=None, executor="slurm")
    pending = [slots.Candidate(i, f"a{i}", 4) for i in range(1, 7)]
    assert [s for _, s in started(slots.next_jobs(pending, {}, pool))] == ["slurm0", "slurm1", "slurm2", "slurm3"]


def test_trainer_locks_are_per_gpu_or_per_cpu_slot(tmp_path):
    assert launch.lock_names(Grant(2, ("0", "3")), "gpu0,3") == ["gpu0", "gpu3"]
    assert launch.lock_names(Grant(2, None), "cpu1") == ["cpu1"]
    fds = launch.acquire_trainer_lock(tmp_path, ["gpu0", "gpu3"])
    try:
        assert launch.held_trainer_lock(tmp_path, ["gpu1", "gpu3"]) == "state/trainer-gpu3.lock"
        assert launch.held_trainer_lock(tmp_path, ["gpu1", "cpu0"]) is None
        with pytest.raises(RuntimeError, match=r"still holds state/trainer-gpu0.lock"):
            launch.acquire_trainer_lock(tmp_path, ["gpu1", "gpu0"], wait=0.3)
        assert launch.held_trainer_lock(tmp_path, ["gpu1"]) is None  # a failed acquire lets go of what it took
    finally:
        for fd in fds:
            os.close(fd)


def test_the_gpu_check_after_a_job_reads_its_own_gpus_only(monkeypatch):
    from daemon.supervisor import gpu
    from test_gpu import FakeNVML

    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    before = gpu.snapshot(["1"])
    assert before["count"] == 1 and before["mem_used_gib"] == 1.0
    nvml.cards[0]["used"] += 20 * gpu.GIB  # the job on GPU 0 goes on training
    message, level, fields = gpu.release_report(before, ["1"])
    assert fields["released"] and level == "info", message
    nvml.cards[1]["used"] += 2 * gpu.GIB  # what the job on GPU 1 left behind
    assert gpu.wait_for_release(before, timeout=0.3, devices=["1"])["after_gib"] == 3.0


def test_a_gpu_gone_or_nvml_silent_blocks_the_queue_instead_of_shrinking_the_pool(root, tiny_model_dir, monkeypatch):
    """Jobs run on GPU 0 and 1; then GPU 1 drops off the bus, then NVML stops answering. Neither may turn the pool
    into fewer GPUs (a 2-GPU job would fail as a bad config) or into CPU slots (a job would land, unlocked, on a
    GPU another job uses): the queue waits, with the reason."""
    from daemon.config import load_config
    from daemon.paths import Layout
    from daemon.supervisor import gate, gpu
    from daemon.supervisor.loop import Supervisor
    from test_gpu import FakeNVML

    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu, "_seen", {})
    path = write_config(root, tiny_model_dir, gpus_per_job=1)
    cfg = load_config(path, root)
    sup = Supervisor(Layout.at(root).ensure(), cfg, path, echo=False)
    assert sup.pool().units == ("0", "1") and gate.gpu_problem(cfg) is None
    nvml.cards.pop()  # GPU 1 is gone
    assert sup.pool() is None
    assert "GPU 1 was visible to the daemon and is not now (NVML lists 0)" in gate.gpu_problem(cfg)

    def silent():
        raise RuntimeError("NVML: driver not loaded")

    monkeypatch.setattr(nvml, "nvmlInit", silent)
    assert sup.pool() is None
    assert "GPU 0, 1 were visible to the daemon and are not now (NVML does not answer)" in gate.gpu_problem(cfg)


# --------------------------------------------------------------------------- two jobs side by side on the CPU

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
TRAINING = {"packing": False, "micro_batch_size": 2, "gradient_accumulation": 1, "checkpoint_every_steps": 2,
            "precision": "fp32"}
# From step 2 on each micro-batch waits a little: both jobs are mid-training when a test acts.
SLOW = faults({"point": "train_step", "kind": "sleep", "seconds": 0.6, "min_step": 2})


def configure(root, model_dir, **extra) -> None:
    write_config(root, model_dir, training=TRAINING, max_parallel_jobs=2,
                 limits={"min_free_disk_mb": 1, "stop_timeout_seconds": 120}, **extra)


def log(root) -> str:
    return (root / "status.log").read_text()


def order(root) -> list[tuple[str, int]]:
    """(event, job_id) of the job events, in the order the daemon logged them."""
    return [(e["event"], e.get("job_id")) for e in events(root) if e.get("job_id") is not None]


def first(rows, kind, job_id) -> int:
    return rows.index((kind, job_id))


def last(rows, kind, job_id) -> int:
    return len(rows) - 1 - rows[::-1].index((kind, job_id))


def both_checkpointed(root, step: int = 2) -> None:
    wait_for(lambda: len({e["job_id"] for e in events(root, "checkpoint") if e.get("step", 0) >= step}) == 2,
             timeout=240, what=f"both jobs to checkpoint at step {step}")


def two_adapters(root) -> Inbox:
    """One file for adapter a, one for b: 12 steps each."""
    inbox = Inbox(root)
    inbox.drop("a.jsonl", chat_lines(24, "apple"), adapter="a")
    inbox.drop("b.jsonl", chat_lines(24, "pear"), adapter="b")
    return inbox


def ids_by_adapter(root) -> dict[str, int]:
    return {j["adapter"]: j["id"] for j in jobs(root)}


@pytest.mark.slow
def test_two_adapters_train_at_the_same_time_and_both_publish(root, tiny_model_dir):
    configure(root, tiny_model_dir, cpu_processes=2)
    inbox = Inbox(root)
    inbox.drop("a.jsonl", chat_lines(12, "apple"), adapter="a")
    inbox.drop("b.jsonl", chat_lines(12, "pear"), adapter="b")
    daemon = start_daemon(root, "--once", **CPU_ONLY, TRAINING_DAEMON_FAULTS=SLOW)
    most = 0
    try:
        while daemon.poll() is None:
            try:
                status = json.loads((root / "status.json").read_text())
                most = max(most, len(status.get("running") or []))
                if status.get("running"):
                    assert status["current"] == status["running"][0]
                    assert status["daemon"]["parallel"]["max"] == 2
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.wait() == 0, (root / "daemon.out").read_text()[-3000:]
    assert most == 2
    fates = account(root, inbox, expect={"a.jsonl": "done", "b.jsonl": "done"})
    assert (root / "checkpoints" / "a" / "v1").is_dir() and (root / "checkpoints" / "b" / "v1").is_dir()
    a, b = fates["a.jsonl"]["id"], fates["b.jsonl"]["id"]
    slots_seen = sorted(re.findall(r"job \d+ started: \w\.jsonl -> adapter \w \(attempt 1\) on (cpu\d)", log(root)))
    assert slots_seen == ["cpu0", "cpu1"]
    assert {j["attempts"][-1]["slot"] for j in fates.values()} == {"cpu0", "cpu1"}
    # Their training overlapped: each one's steps came while the other was between its first and last step.
    rows = order(root)
    assert first(rows, "progress", b) < last(rows, "progress", a)
    assert first(rows, "progress", a) < last(rows, "progress", b)


@pytest.mark.slow
def test_a_later_job_of_an_adapter_waits_for_the_earlier_one_while_another_adapter_runs(root, tiny_model_dir):
    configure(root, tiny_model_dir)
    assert cli(root, "pause").returncode == 0  # queue all three first, in a known order
    inbox = Inbox(root)
    daemon = start_daemon(root, **CPU_ONLY, TRAINING_DAEMON_FAULTS=SLOW)
    try:
        for n, (name, adapter) in enumerate([("a1.jsonl", "a"), ("a2.jsonl", "a"), ("b1.jsonl", "b")], 1):
            inbox.drop(name, chat_lines(12, name), adapter=adapter)
            wait_for(lambda n=n: len(jobs(root)) == n, timeout=60, what=f"{name} queued")
        a1, a2, b1 = (j["id"] for j in jobs(root))
        assert cli(root, "resume").returncode == 0
        wait_for(lambda: {j["folder"] for j in jobs(root)} == {"done"}, timeout=300, what="all three done")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    rows = order(root)
    assert first(rows, "job_started", b1) < first(rows, "gpu_memory", a1)  # b beside a's first job
    assert first(rows, "gpu_memory", a1) < first(rows, "job_started", a2)  # a's second only after its first
    assert [j["version"] for j in jobs(root)] == [1, 2, 1]
    account(root, inbox)


@pytest.mark.slow
def test_daemon_killed_with_two_jobs_running_each_resumes_once(root, tiny_model_dir):
    configure(root, tiny_model_dir)
    inbox = two_adapters(root)
    daemon = start_daemon(root, **CPU_ONLY, TRAINING_DAEMON_FAULTS=SLOW)
    try:
        both_checkpointed(root)
        orphans = trainer_pids(root)
        assert len(orphans) == 2
        daemon.kill()
        daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    # Nobody kills the orphans: their lifelines make them exit.
    wait_for(lambda: not set(orphans) & set(trainer_pids(root)), timeout=20, what="the orphaned trainers to exit")
    assert [j["folder"] for j in jobs(root)] == ["running", "running"]

    r = cli(root, "run", "--once", **CPU_ONLY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fates = account(root, inbox)  # each done once; no version published twice
    for job in fates.values():
        assert [a["outcome"] for a in job["attempts"]] == ["interrupted", "done"]
        assert job["version"] == 1
    resumed = {e["job_id"]: e["step"] for e in resumes(root)}
    assert sorted(resumed) == sorted(j["id"] for j in fates.values()) and min(resumed.values()) >= 2
    for job_id, step in resumed.items():
        assert re.search(rf"job {job_id} started: .* \(attempt 2\) on cpu\d", log(root))
        assert f"job {job_id}: resumed from step-{step:06d} (step {step})" in log(root)


@pytest.mark.slow
def test_warm_stop_with_two_jobs_running_checkpoints_both_and_the_next_start_resumes_both(root, tiny_model_dir):
    configure(root, tiny_model_dir)
    inbox = two_adapters(root)
    daemon = start_daemon(root, **CPU_ONLY, TRAINING_DAEMON_FAULTS=SLOW)
    try:
        both_checkpointed(root)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=180) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    stopped = jobs(root)
    assert [(j["folder"], j["attempts"][-1]["outcome"]) for j in stopped] == [("pending", "stopped")] * 2
    assert len(re.findall(r"job \d+: asking the trainer to checkpoint and stop", log(root))) == 2

    r = cli(root, "run", "--once", **CPU_ONLY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fates = account(root, inbox, expect={"a.jsonl": "done", "b.jsonl": "done"})
    assert sorted(e["job_id"] for e in resumes(root)) == sorted(j["id"] for j in fates.values())


@pytest.mark.slow
def test_cancelling_one_of_two_running_jobs_leaves_the_other_to_finish(root, tiny_model_dir):
    configure(root, tiny_model_dir)
    inbox = two_adapters(root)
    daemon = start_daemon(root, "--once", **CPU_ONLY, TRAINING_DAEMON_FAULTS=SLOW)
    try:
        both_checkpointed(root)
        ids = ids_by_adapter(root)
        r = cli(root, "cancel", str(ids["a"]))
        assert r.returncode == 0, r.stderr
        assert daemon.wait(timeout=240) == 1  # --once: a job did not succeed
    finally:
        if daemon.poll() is None:
            daemon.kill()
    fates = account(root, inbox, expect={"a.jsonl": "failed", "b.jsonl": "done"}, reasons={"a.jsonl": "cancel"})
    assert fates["b.jsonl"]["attempts"][-1]["outcome"] == "done"
    assert not (root / "checkpoints" / "a" / "v1").exists()


# --------------------------------------------------------------------------- Slurm jobs across a daemon restart


class FakeSlurmJob:
    """Stands in for slurm.SlurmTrainer: a batch job that is still running."""

    early_pid, last_event, done = None, None, False

    def describe(self) -> str:
        return "Slurm job 45"


def test_a_slurm_job_left_running_is_re_attached_and_one_that_is_gone_is_swept(root, tiny_model_dir, monkeypatch):
    import daemon.supervisor
    from daemon.config import load_config
    from daemon.paths import Layout
    from daemon.supervisor import attempts
    from daemon.supervisor.job import JobStatus
    from daemon.supervisor.loop import Supervisor

    path = write_config(root, tiny_model_dir, executor="slurm")
    layout = Layout.at(root).ensure()
    sup = Supervisor(layout, load_config(path, root), path, echo=False)
    for n, slurm_id in enumerate(["45", "46"], 1):
        (layout.inbox / f"{n}.jsonl").write_text('{"text": "hi"}\n')
        job = sup.spool.claim(layout.inbox / f"{n}.jsonl", "default", f"{n}.jsonl")
        job.attempts.append({"n": 1, "started_at": "2026-01-01T00:00:00+00:00", "executor": "slurm",
                             "slot": "slurm0", "devices": None, "slurm_job_id": slurm_id})
        sup.spool.move(job, JobStatus.RUNNING)
    asked = []

    def reattach(job, job_dir, cfg, layout, record):
        asked.append(record["slurm_job_id"])
        return FakeSlurmJob() if record["slurm_job_id"] == "45" else None  # 46 ended while no daemon ran

    fake = type(sys)("daemon.supervisor.slurm")
    fake.reattach = reattach
    monkeypatch.setitem(sys.modules, "daemon.supervisor.slurm", fake)
    monkeypatch.setattr(daemon.supervisor, "slurm", fake, raising=False)

    kept = attempts.reattach(sup)
    lines = sup.spool.sweep(3, keep=kept)
    assert asked == ["45", "46"] and kept == {1} and list(sup.running) == [1]
    assert sup.running[1].current["slurm_job_id"] == "45" and sup.current["executor"] == "slurm"
    assert "job 1: re-attached to Slurm job 45" in log(root)
    assert [j["folder"] for j in jobs(root)] == ["running", "pending"]
    assert lines == [line for line in lines if line.startswith("job 2 ")] and len(lines) == 1
