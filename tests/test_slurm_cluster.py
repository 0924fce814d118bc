"""The test Slurm cluster is real: jobs run, steps get ranks, signals and exit codes behave as the executor expects.

The Slurm executor builds on exactly these behaviours (what `scancel --signal` reaches, what an ended job's
state and ExitCode look like); if a Slurm version changed them, these tests say so before the executor's do.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _wait_for(paths: list[Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.1)


def test_a_batch_job_runs_to_completed_and_writes_its_output(slurm_cluster, root):
    job = slurm_cluster.sbatch_wrap("echo hello from $SLURM_JOB_ID", f"--output={root}/out.txt")

    info = slurm_cluster.wait_state(job, "COMPLETED")

    assert info["ExitCode"] == "0:0"
    assert (root / "out.txt").read_text() == f"hello from {job}\n"


def test_a_two_task_step_sees_ranks_0_and_1(slurm_cluster, root):
    job = slurm_cluster.sbatch_wrap("srun bash -c 'echo rank=$SLURM_PROCID of $SLURM_NTASKS'",
                                    "--ntasks=2", f"--output={root}/out.txt")

    slurm_cluster.wait_state(job, "COMPLETED")

    assert sorted((root / "out.txt").read_text().splitlines()) == ["rank=0 of 2", "rank=1 of 2"]


def test_two_jobs_of_two_tasks_run_at_once(slurm_cluster, root):
    jobs = [slurm_cluster.sbatch_wrap(f"srun bash -c 'touch {root}/j{i}-$SLURM_PROCID; sleep 60'", "--ntasks=2")
            for i in range(2)]
    try:
        _wait_for([root / f"j{i}-{rank}" for i in range(2) for rank in range(2)])
        assert [slurm_cluster.job_info(j)["JobState"] for j in jobs] == ["RUNNING", "RUNNING"]
    finally:
        slurm_cluster.run("scancel", *jobs)


def test_scancel_ends_a_sleeping_job_as_cancelled(slurm_cluster, root):
    job = slurm_cluster.sbatch_wrap(f"touch {root}/started; sleep 300")
    _wait_for([root / "started"])

    slurm_cluster.run("scancel", job)

    info = slurm_cluster.wait_state(job, "CANCELLED", timeout=20)
    assert info["ExitCode"] == "0:15"  # rc:signal - SIGTERM ended it


def test_a_job_exiting_75_is_failed_with_exit_code_75(slurm_cluster, root):
    job = slurm_cluster.sbatch_wrap("exit 75")

    info = slurm_cluster.wait_state(job, "FAILED")

    assert info["ExitCode"] == "75:0"
    assert info["Reason"] == "NonZeroExitCode"


TASK = """\
import os, signal, sys, time
rank = os.environ["SLURM_PROCID"]
def on_usr1(signum, frame):
    open(f"usr1-{rank}", "w").write("USR1\\n")
    sys.exit(75)
signal.signal(signal.SIGUSR1, on_usr1)
open(f"ready-{rank}", "w").close()
time.sleep(120)
"""


def test_scancel_signal_usr1_reaches_the_step_tasks_not_the_batch_shell(slurm_cluster, root):
    (root / "task.py").write_text(TASK)
    script = root / "job.sh"
    script.write_text(f"""#!/bin/bash
trap 'echo USR1 > batch-usr1' USR1
srun {sys.executable} task.py
echo "srun rc=$?" > after-srun
""")
    out = slurm_cluster.run("sbatch", "--parsable", "--ntasks=2", f"--chdir={root}", f"--output={root}/out.txt",
                            str(script)).stdout
    job = out.strip().split(";")[0]
    _wait_for([root / "ready-0", root / "ready-1"])

    slurm_cluster.run("scancel", "--signal=USR1", job)

    info = slurm_cluster.wait_state(job, "COMPLETED")
    assert (root / "usr1-0").read_text() == "USR1\n"
    assert (root / "usr1-1").read_text() == "USR1\n"
    # The batch shell was neither signalled nor killed: it went on after srun, which passed the tasks' 75 on.
    assert not (root / "batch-usr1").exists()
    assert (root / "after-srun").read_text() == "srun rc=75\n"
    assert info["ExitCode"] == "0:0"
