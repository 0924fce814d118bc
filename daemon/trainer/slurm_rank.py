"""One rank of a job under Slurm: `srun python -m daemon.trainer.slurm_rank JOB_DIR --root ROOT`.

What daemon/supervisor/launch.py does for a local job, done here from Slurm's own variables: the environment
torchrun would give the rank (so `accelerate.Accelerator()` sets up the process group), its stderr in the job's
trainer log, rank 0's events into <job_dir>/events.jsonl (there is no pipe to a daemon: the job outlives it), and
at the end its exit status in <job_dir>/slurm-rank<r>.exit, since Slurm keeps no per-task status the daemon can
read later. The trainer itself (daemon.trainer.main) runs in this process, unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EVENTS_FILE = "events.jsonl"
EVENTS_ENV = "TRAINING_DAEMON_EVENTS_FILE"  # daemon/trainer/process.emit appends there when set
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def exit_file(job_dir: Path, rank: int) -> Path:
    return job_dir / f"slurm-rank{rank}.exit"


def tasks_on_this_node(env: dict) -> int:
    """SLURM_NTASKS_PER_NODE when set; else this node's count in SLURM_STEP_TASKS_PER_NODE ("2(x3),1")."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    return counts[min(int(env.get("SLURM_NODEID", "0")), len(counts) - 1)]


def rank_env(env: dict) -> dict:
    """torchrun's names from Slurm's: RANK, LOCAL_RANK, WORLD_SIZE, ... (MASTER_ADDR/PORT: the batch script).
    One task: none of them, as for a local single-process trainer."""
    out = {k: v for k, v in env.items() if k not in DIST_VARS}
    world = int(env.get("SLURM_NTASKS", "1"))
    if world > 1:
        rank, local = env["SLURM_PROCID"], env.get("SLURM_LOCALID", "0")
        out.update(RANK=rank, LOCAL_RANK=local, WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(tasks_on_this_node(env)), GROUP_RANK=env.get("SLURM_NODEID", "0"),
                   ROLE_RANK=rank, ROLE_WORLD_SIZE=str(world))
        out.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            out.pop(name, None)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.trainer.slurm_rank")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--micro-batch", type=int)
    args = ap.parse_args(argv)
    job_dir = args.job_dir.resolve()
    env = rank_env(dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    rank = int(os.environ.get("RANK", "0"))
    from daemon.protocol import log_name

    # stdout too: a library's print must not land in Slurm's output file as if it were the daemon's script.
    log = os.open(job_dir / log_name(rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out = log if rank == 0 else os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(log, 2)
    if rank == 0:
        os.environ[EVENTS_ENV] = str(job_dir / EVENTS_FILE)
    else:
        os.environ.pop(EVENTS_ENV, None)
    from daemon.trainer import main as trainer

    cmd = [str(job_dir), "--root", str(args.root)]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    try:
        code = trainer.main(cmd)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    write_exit(job_dir, rank, code if isinstance(code, int) else 1)
    return code


def write_exit(job_dir: Path, rank: int, code: int) -> None:
    """The rank's exit status for the daemon, durably (it may read it after a restart): with the Slurm job and
    the run (restart count) it belongs to."""
    from daemon import durable
    from daemon.timefmt import now_iso

    try:
        durable.write_json(exit_file(job_dir, rank), {
            "code": code, "rank": rank, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "at": now_iso()})
    except OSError as e:  # the daemon then sees a rank that said nothing: the attempt fails and is retried
        print(f"could not write the rank's exit status: {e}", file=sys.stderr)


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status if isinstance(status, int) else 1)  # as daemon.trainer.main: skip the slow teardown
