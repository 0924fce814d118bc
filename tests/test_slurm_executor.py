"""`executor: slurm` against a real one-node Slurm cluster (tests/slurm_cluster.py), through the daemon.

Each job's attempt is one Slurm batch job whose 2 tasks are gloo ranks on the CPU (tasks_per_node 2), so what it
trains can be compared with the local executor's `cpu_processes: 2` run of the same file and config. What is
checked is what an operator sees: the published adapter, the job's state and attempts, status.log's lines and
Slurm's own record of the job. Without Slurm (or when the cluster cannot start) every test skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from daemon.trainer.slurm_rank import rank_env, tasks_on_this_node
from helpers import chat_lines, cli, drop, events, jobs, start_daemon, wait_for, write_config


def cluster_test(f):
    """A test on the real cluster: slow (trainings through Slurm), with room for the module's reference runs."""
    return pytest.mark.slow(pytest.mark.timeout(600)(f))


# As tests/test_distributed.py: ~20 optimizer steps of 4 micro-batches, 2 per rank, and an eval.
TRAINING = {"micro_batch_size": 1, "gradient_accumulation": 4, "epochs": 10, "checkpoint_every_steps": 3,
            "eval_fraction": 0.1, "eval_max_examples": 3}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# From step 2 on each micro-batch sleeps a little (numbers unchanged): a stop or a cancel lands mid-training.
SLOW_STEPS = {"TRAINING_DAEMON_FAULTS": json.dumps([{"point": "train_step", "kind": "sleep", "seconds": 0.3,
                                                      "min_step": 2}])}


def configure(root, model_dir, executor: str = "slurm", **slurm) -> None:
    write_config(root, model_dir, training=TRAINING, cpu_processes=2, executor=executor,
                 slurm={"tasks_per_node": 2, "poll_seconds": 0.5, **slurm},
                 limits={"max_attempts": 3, "min_free_disk_mb": 1})
    drop(root, "data.jsonl", chat_lines(30))


def adapter(root, version=1) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors"))


def train(root, cluster) -> None:
    r = cli(root, "run", "--once", **CPU_ONLY, **cluster.env)
    assert r.returncode == 0, f"{r.stdout[-3000:]}{r.stderr[-3000:]}\njobs: {jobs(root)}"


def status_log(root) -> str:
    path = root / "status.log"
    return path.read_text() if path.exists() else ""


def slurm_id(root) -> str:
    def recorded():
        found = jobs(root)
        return found and found[0]["attempts"] and found[0]["attempts"][-1].get("slurm_job_id")

    return wait_for(recorded, timeout=60, what="the Slurm job id in job.json")


def slurm_jobs_named(cluster, name: str) -> list[str]:
    """Every job the controller knows (ended ones too, for MinJobAge) with that name."""
    out = cluster.run("scontrol", "show", "job", "-o", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if f" JobName={name} " in f" {line} "]


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_slurm_task_gets_torchruns_environment():
    """No cluster needed: what daemon.trainer.slurm_rank makes of Slurm's variables (second node of three, 2 tasks
    on each but the last)."""
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "5", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "MASTER_ADDR": "n1", "MASTER_PORT": "15007", "RANK": "9"}
    got = rank_env(env)
    assert {k: got[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "5", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert got["OMP_NUM_THREADS"] == "1" and got["MASTER_ADDR"] == "n1"
    assert tasks_on_this_node({**env, "SLURM_NODEID": "2"}) == 1
    # One task: a lone trainer, with none of a group's variables (not even a stale RANK from outside).
    alone = rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "MASTER_PORT": "15007"})
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & alone.keys()


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir, slurm_cluster):
    """The same job trained uninterrupted by the local executor (2 gloo processes) and through Slurm (2 tasks)."""
    out = {}
    for executor in ("local", "slurm"):
        root = tmp_path_factory.mktemp(f"reference-{executor}")
        configure(root, tiny_model_dir, executor)
        train(root, slurm_cluster)
        out[executor] = root
    return out


@cluster_test
def test_two_slurm_tasks_train_the_adapter_the_local_executor_trains(references):
    local, slurm = references["local"], references["slurm"]
    assert_close(adapter(slurm), adapter(local))
    (job,) = jobs(slurm)
    assert job["folder"] == "done"
    (attempt,) = job["attempts"]
    assert attempt["executor"] == "slurm" and attempt["slurm_job_name"].startswith("td-")
    job_dir = slurm / "queue" / "done" / f"j{job['id']:06d}"
    assert (job_dir / "trainer-rank1.log").exists()  # the second task was a rank of its own
    assert [json.loads((job_dir / f"slurm-rank{r}.exit").read_text())["code"] for r in (0, 1)] == [0, 0]
    assert f"submitted as Slurm job {attempt['slurm_job_id']}" in status_log(slurm)
    meta = json.loads((slurm / "checkpoints" / "default" / "v1" / "metadata.json").read_text())
    assert meta["plan"]["processes"] == 2


@cluster_test
def test_warm_stop_through_slurms_signal_then_resume_to_the_same_adapter(root, tiny_model_dir, slurm_cluster,
                                                                           references):
    configure(root, tiny_model_dir)
    daemon = start_daemon(root, **CPU_ONLY, **SLOW_STEPS, **slurm_cluster.env)
    try:
        first = slurm_id(root)
        wait_for(lambda: [e for e in events(root, "progress") if e["step"] >= 3], timeout=180, what="step 3")
        daemon.send_signal(signal.SIGTERM)  # the daemon asks Slurm to send SIGUSR1 to every rank
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (job,) = jobs(root)
    assert job["folder"] == "pending" and job["attempts"][-1]["outcome"] == "stopped", job
    assert f"job {job['id']}: asking the trainer to checkpoint and stop" in status_log(root)
    info = slurm_cluster.wait_state(first, ("FAILED", "COMPLETED"), timeout=30)
    assert info["ExitCode"] == "75:0"  # the trainer's own "stopped after a checkpoint"
    ckpt = sorted((root / "queue" / "pending" / f"j{job['id']:06d}" / "resume").glob("step-*"))[-1]
    stopped_at = json.loads((ckpt / "progress.json").read_text())["step"]

    train(root, slurm_cluster)
    assert [e["step"] for e in events(root, "resumed")] == [stopped_at]
    (job,) = jobs(root)
    assert job["folder"] == "done" and [a["outcome"] for a in job["attempts"]] == ["stopped", "done"]
    assert job["attempts"][1]["slurm_job_id"] != first
    assert_close(adapter(root), adapter(references["slurm"]))


@cluster_test
def test_a_slurm_job_cancelled_by_hand_fails_its_attempt_and_the_job_resumes_to_done(root, tiny_model_dir,
                                                                                    slurm_cluster):
    configure(root, tiny_model_dir)
    daemon = start_daemon(root, "--once", **CPU_ONLY, **SLOW_STEPS, **slurm_cluster.env)
    try:
        first = slurm_id(root)
        wait_for(lambda: events(root, "checkpoint"), timeout=180, what="a checkpoint")
        slurm_cluster.run("scancel", first)
        assert daemon.wait(timeout=300) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (job,) = jobs(root)
    assert job["folder"] == "done", job
    cancelled, done = job["attempts"]
    assert cancelled["outcome"] == "failed" and f"Slurm job {first}" in cancelled["error"], cancelled
    assert "CANCELLED" in cancelled["error"]
    assert done["outcome"] == "done" and done["slurm_job_id"] != first
    assert len(events(root, "resumed")) == 1  # the retry went on from the checkpoint
    assert "CANCELLED" in status_log(root)


@cluster_test
@pytest.mark.parametrize("recorded", ["id", "name only"])
def test_daemon_killed_while_its_slurm_job_runs_reattaches_and_ends_the_job_once(root, tiny_model_dir,
                                                                               slurm_cluster, recorded):
    configure(root, tiny_model_dir)
    daemon = start_daemon(root, **CPU_ONLY, **SLOW_STEPS, **slurm_cluster.env)
    try:
        first = slurm_id(root)
        wait_for(lambda: [e for e in events(root, "progress") if e["step"] >= 2], timeout=180, what="step 2")
        daemon.kill()  # SIGKILL: no stop reaches Slurm; the job trains on without the daemon
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert slurm_cluster.job_info(first)["JobState"] == "RUNNING"
    if recorded == "name only":  # as if the daemon had died between sbatch and saving the id it answered
        manifest = root / "queue" / "running" / "j000001" / "job.json"
        saved = json.loads(manifest.read_text())
        del saved["attempts"][-1]["slurm_job_id"]
        manifest.write_text(json.dumps(saved))
    train(root, slurm_cluster)
    assert f"re-attached to Slurm job {first}" in status_log(root)
    (job,) = jobs(root)
    assert job["folder"] == "done" and [a["outcome"] for a in job["attempts"]] == ["done"], job
    assert slurm_jobs_named(slurm_cluster, job["attempts"][0]["slurm_job_name"]) == [f"JobId={first}"]
    assert sorted(p.name for p in (root / "checkpoints" / "default").glob("v*")) == ["v1"]
    assert sum(1 for line in status_log(root).splitlines() if f"job {job['id']} done:" in line) == 1
    assert published_lines(root) == 1


def published_lines(root) -> int:
    return sum(1 for line in status_log(root).splitlines() if "published version" in line)


@cluster_test
def test_reattach_after_published_reports_it_once_keeps_its_staging_and_waits_for_a_silent_squeue(
        root, tiny_model_dir, slurm_cluster, tmp_path):
    """The daemon dies right after reporting `published` (fault point slurm_published_reported), and had not saved
    the Slurm job id (name only); at the restart squeue first fails ("Unable to contact slurm controller"). The
    restarted daemon keeps the attempt, finds the job by name at a later poll, does not report the version
    again, and leaves the job's publish staging folder alone (another job's leftover goes)."""
    configure(root, tiny_model_dir)
    once = tmp_path / "fired"
    fault = [{"point": "slurm_published_reported", "kind": "kill", "once_file": str(once)}]
    daemon = start_daemon(root, "--once", **CPU_ONLY, **slurm_cluster.env,
                          TRAINING_DAEMON_FAULTS=json.dumps(fault))
    try:
        first = slurm_id(root)
        assert daemon.wait(timeout=300) == -signal.SIGKILL
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert published_lines(root) == 1
    manifest = root / "queue" / "running" / "j000001" / "job.json"
    saved = json.loads(manifest.read_text())
    assert saved["attempts"][-1]["events_offset"] > 0
    del saved["attempts"][-1]["slurm_job_id"]
    manifest.write_text(json.dumps(saved))
    staging = root / "checkpoints" / "default"
    (staging / ".tmp-job1-4242").mkdir()  # as if job 1's trainer were between staging and renaming a version
    (staging / ".tmp-job9-4242").mkdir()  # a crashed job's leftover
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "squeue").write_text(
        f'#!/bin/bash\nif [ ! -e {tmp_path}/failed ]; then touch {tmp_path}/failed\n'
        'echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2; exit 1; fi\n'
        f'exec {shutil.which("squeue")} "$@"\n')
    (stub / "squeue").chmod(0o755)
    r = cli(root, "run", "--once", **CPU_ONLY, **slurm_cluster.env, PATH=f"{stub}:{os.environ['PATH']}")
    assert r.returncode == 0, f"{r.stdout[-3000:]}{r.stderr[-3000:]}"
    log = status_log(root)
    assert (tmp_path / "failed").exists() and "Slurm did not answer when asked for the job named" in log
    assert f"found Slurm job {first} by its name" in log
    (job,) = jobs(root)
    assert job["folder"] == "done" and [a["outcome"] for a in job["attempts"]] == ["done"], job
    assert published_lines(root) == 1  # not again after the re-attach (nor a second hook delivery)
    assert (staging / ".tmp-job1-4242").is_dir() and not (staging / ".tmp-job9-4242").exists()
    assert sorted(p.name for p in staging.glob("v*")) == ["v1"]


@cluster_test
def test_a_lost_sbatch_answer_is_adopted_and_an_earlier_attempts_orphan_cancelled_under_a_root_with_a_space(
        tmp_path, tiny_model_dir, slurm_cluster):
    """Attempt 1 dies with the daemon (fault at job_start) while an orphan of it trains in Slurm; attempt 2's
    sbatch answer is lost after Slurm took the job (fault point sbatch, kind timeout). Exactly one Slurm job
    trains: the orphan is cancelled before attempt 2 is submitted, and attempt 2's job is found by its name.
    The root has a space in its path (#SBATCH lines quote it)."""
    root = tmp_path / "data root"
    root.mkdir()
    configure(root, tiny_model_dir)
    faults = [{"point": "job_start", "kind": "kill", "once_file": str(tmp_path / "killed")},
              {"point": "sbatch", "kind": "timeout", "once_file": str(tmp_path / "lost")}]
    env = {**CPU_ONLY, **slurm_cluster.env, "TRAINING_DAEMON_FAULTS": json.dumps(faults)}
    assert cli(root, "run", "--once", **env).returncode == -signal.SIGKILL
    from daemon.supervisor.slurm_script import job_name

    orphan = slurm_cluster.sbatch_wrap("sleep 300", f"--job-name={job_name(root.resolve(), 1, 1)}", cwd=tmp_path)
    train_env = cli(root, "run", "--once", **env)
    assert train_env.returncode == 0, f"{train_env.stdout[-3000:]}{train_env.stderr[-3000:]}"
    assert slurm_cluster.wait_state(orphan, "CANCELLED", timeout=30)
    log = status_log(root)
    assert f"cancelled Slurm job {orphan}" in log and "of an earlier attempt of this job" in log
    (job,) = jobs(root)
    assert job["folder"] == "done" and [a["outcome"] for a in job["attempts"]] == ["interrupted", "done"], job
    second = job["attempts"][1]
    assert f"but Slurm has job {second['slurm_job_id']} under this attempt's name" in log
    assert slurm_jobs_named(slurm_cluster, second["slurm_job_name"]) == [f"JobId={second['slurm_job_id']}"]
    assert (root / "queue" / "done" / "j000001" / f"slurm-{second['slurm_job_id']}.out").exists()
    assert published_lines(root) == 1
    assert sorted(p.name for p in (root / "checkpoints" / "default").glob("v*")) == ["v1"]


@cluster_test
@pytest.mark.parametrize("case", ["sbatch missing", "unknown partition", "sbatch refuses"])
def test_slurm_unusable_blocks_the_queue_with_the_reason_and_loses_nothing(root, tiny_model_dir, slurm_cluster,
                                                                           tmp_path, case):
    """The gate sees what it can before submitting (no attempt at all); a refusal only sbatch knows of ends the
    attempt as unavailable, not counted. Either way the queue is blocked with the reason and the job waits."""
    extra = {}
    if case == "sbatch missing":
        configure(root, tiny_model_dir)
        (tmp_path / "bin").mkdir()
        extra["PATH"] = str(tmp_path / "bin")  # the daemon runs by its absolute interpreter: nothing else needed
        expected, outcomes = "Slurm: sbatch not found on PATH", []
    elif case == "unknown partition":
        configure(root, tiny_model_dir, partition="nope")
        expected, outcomes = "Slurm: partition nope does not exist", []
    else:
        configure(root, tiny_model_dir, gpus_per_node=1)  # the cluster has no GPU
        expected, outcomes = "sbatch refused: sbatch: error: Invalid generic resource", ["unavailable"]
    daemon = start_daemon(root, **CPU_ONLY, **slurm_cluster.env, **extra)
    try:
        blocked = wait_for(lambda: [line for line in status_log(root).splitlines()
                                    if "blocked, no job starts" in line], timeout=60, what="the queue blocked")
        assert expected in blocked[0], status_log(root)
        wait_for(lambda: expected in cli(root, "status", **slurm_cluster.env).stdout, timeout=30, interval=1,
                 what="`training-daemon status` showing the reason")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "Traceback" not in (root / "daemon.out").read_text()
    (job,) = jobs(root)
    assert job["folder"] == "pending" and [a["outcome"] for a in job["attempts"]] == outcomes, job


@cluster_test
def test_slurm_requeue_mid_training_resumes_from_the_checkpoint_and_ends_done_once(root, tiny_model_dir,
                                                                                  slurm_cluster):
    configure(root, tiny_model_dir)
    daemon = start_daemon(root, "--once", **CPU_ONLY, **SLOW_STEPS, **slurm_cluster.env)
    try:
        first = slurm_id(root)
        wait_for(lambda: events(root, "checkpoint"), timeout=180, what="a checkpoint")
        slurm_cluster.run("scontrol", "requeue", first)
        # Slurm holds a requeued job back for a while (BeginTime, ~2 min): bring its start forward.
        wait_for(lambda: slurm_cluster.job_info(first).get("Restarts") == "1"
                 and slurm_cluster.job_info(first).get("JobState") == "PENDING", timeout=60, what="the requeue")
        slurm_cluster.run("scontrol", "update", f"JobId={first}", "StartTime=now")
        assert daemon.wait(timeout=300) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (job,) = jobs(root)
    assert job["folder"] == "done" and [a["outcome"] for a in job["attempts"]] == ["done"], job
    assert int(slurm_cluster.job_info(first)["Restarts"]) == 1
    assert len(events(root, "resumed")) == 1
    assert f"Slurm requeued job {first}" in status_log(root)
    assert sorted(p.name for p in (root / "checkpoints" / "default").glob("v*")) == ["v1"]


@cluster_test
def test_a_job_queued_in_slurm_is_not_stalled_and_a_warm_stop_withdraws_it(root, tiny_model_dir, slurm_cluster):
    configure(root, tiny_model_dir, extra_sbatch=["--begin=now+3600"])  # Slurm holds it back for an hour
    write_config(root, tiny_model_dir, training=TRAINING, cpu_processes=2, executor="slurm",  # and short timeouts
                 slurm={"tasks_per_node": 2, "poll_seconds": 0.5, "extra_sbatch": ["--begin=now+3600"]},
                 limits={"max_attempts": 3, "min_free_disk_mb": 1, "start_timeout_seconds": 5,
                         "stall_timeout_seconds": 5})
    daemon = start_daemon(root, **CPU_ONLY, **slurm_cluster.env)
    try:
        first = slurm_id(root)

        def running() -> list[dict]:
            try:
                return json.loads((root / "status.json").read_text()).get("running") or []
            except ValueError:  # caught mid-replace
                return []

        wait_for(lambda: [r for r in running() if r.get("phase") == "queued in Slurm"], timeout=30,
                 what="status.json showing the job queued in Slurm")
        assert f"Slurm job {first} waits in Slurm's queue (BeginTime)" in status_log(root)
        time.sleep(8)  # longer than the start and stall timeouts: waiting in Slurm's queue is no stall
        assert slurm_cluster.job_info(first)["JobState"] == "PENDING"
        assert "stalled" not in status_log(root)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert slurm_cluster.wait_state(first, "CANCELLED", timeout=30)
    (job,) = jobs(root)
    assert job["folder"] == "pending" and [a["outcome"] for a in job["attempts"]] == ["stopped"], job
