"""The batch script a job's attempt is submitted with under `executor: slurm` (daemon/supervisor/slurm.py submits
it): the #SBATCH lines from the config's `slurm:` section, then one `srun` of daemon.trainer.slurm_rank per task.

The daemon writes the script itself instead of handing a Python callable to a library (submitit): the job folder
stays the one layout every executor shares (trainer.log, events.jsonl, resume/), the warm stop is the trainer's
own SIGUSR1, and what a requeue or a time limit means is the daemon's policy. No torch here.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path

from daemon.paths import PROJECT_DIR

BATCH_SCRIPT = "slurm-batch.sh"
# The rendezvous port is derived from the Slurm job id (the same on every node, and again after a requeue), in a
# range below the kernel's ephemeral ports (launch.free_port says why).
PORT_BASE, PORT_SPAN = 15000, 15000
SIGNAL_MAX_SECONDS = 65535  # sbatch --signal's upper bound on the lead time


def job_name(root: Path, job_id: int, attempt: int) -> str:
    """td-<root hash>-j<id>-a<n>: unique per data root, job and attempt, so a daemon that died between sbatch
    and saving job.json finds its job again by name (squeue -n), and two roots sharing a cluster never mix."""
    return f"td-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}-j{job_id}-a{attempt}"


def tasks_per_node(cfg) -> int:
    """Processes per node: the config's, else one per GPU of a node, else `cpu_processes` (gloo on CPU)."""
    s = cfg.slurm
    return s.tasks_per_node or (s.gpus_per_node if s.gpus_per_node > 0 else cfg.cpu_processes)


def world_size(cfg) -> int:
    return cfg.slurm.nodes * tasks_per_node(cfg)


def signal_lead_seconds(cfg) -> int:
    """How long before the time limit Slurm sends SIGUSR1 (a warm stop): what a warm stop is allowed to take,
    plus a minute, since Slurm's signal timer only fires once a minute or so."""
    return int(min(SIGNAL_MAX_SECONDS, cfg.limits.stop_timeout_seconds + 60))


def directive_path(path: str, pattern: bool = False) -> str:
    """A path as an #SBATCH value: in double quotes (sbatch cuts an unquoted value at a space), and with `%`
    doubled where Slurm expands filename patterns (%j...) so a `%` of the path stays itself."""
    if '"' in path or "\n" in path:
        raise ValueError(f"a path with a double quote or a newline cannot go on an #SBATCH line: {path!r}")
    return '"' + (path.replace("%", "%%") if pattern else path) + '"'


def sbatch_options(cfg, job_dir: Path, name: str) -> list[str]:
    s = cfg.slurm
    out = directive_path(str(job_dir), pattern=True)[:-1] + '/slurm-%j.out"'
    opts = [f"--job-name={name}",
            f"--output={out}", f"--error={out}",
            "--open-mode=append",  # a requeued run adds to the same file instead of replacing it
            f"--chdir={directive_path(str(PROJECT_DIR))}",
            f"--signal=USR1@{signal_lead_seconds(cfg)}",
            f"--nodes={s.nodes}", f"--ntasks-per-node={tasks_per_node(cfg)}",
            "--requeue" if s.requeue else "--no-requeue"]
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time_limit),
                       ("cpus-per-task", s.cpus_per_task), ("mem", s.mem)):
        if value is not None:
            opts.append(f"--{key}={value}")
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    return opts + list(s.extra_sbatch)


def batch_script(cfg, job_dir: Path, root: Path, name: str, micro_batch: int | None) -> str:
    python = cfg.slurm.python or sys.executable
    rank_cmd = [python, "-m", "daemon.trainer.slurm_rank", str(job_dir), "--root", str(root)]
    if micro_batch:
        rank_cmd += ["--micro-batch", str(micro_batch)]
    q = shlex.quote
    lines = ["#!/bin/bash", *(f"#SBATCH {opt}" for opt in sbatch_options(cfg, job_dir, name)), "",
             "# Written by training-daemon for one attempt of one job (daemon/supervisor/slurm.py watches it).",
             "set -u",
             # A USR1 that reaches this shell too (a time limit's warm stop) must not end it before srun has
             # reported the ranks' statuses; a handler, not an ignore, so srun itself keeps the default.
             "trap 'true' USR1",
             f"export PYTHONPATH={q(str(PROJECT_DIR))}${{PYTHONPATH:+:$PYTHONPATH}}",
             "export PYTHONUNBUFFERED=1",
             'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
             "export MASTER_ADDR MASTER_PORT",
             # This run's ranks write their statuses anew: an earlier run's (before a requeue) must not speak for it.
             f"rm -f {q(str(job_dir))}/slurm-rank*.exit",
             'echo "training-daemon: Slurm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})'
             ' on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"',
             "srun --kill-on-bad-exit=1 " + " ".join(q(a) for a in rank_cmd), ""]
    return "\n".join(lines)
