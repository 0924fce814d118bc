"""Where jobs run: several at once on one host (`gpus_per_job`, `max_parallel_jobs`) and the executor
(`executor: local | slurm`, the `slurm:` section).

Kept apart from config.py so that file stays readable; config.py puts these keys in DaemonConfig. What places
jobs is daemon/supervisor/slots.py; what submits them to Slurm is daemon/supervisor/slurm.py; docs/cluster.md
is the operator's guide.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


Count = Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=4096)]

# A Slurm time limit as sbatch takes it: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2}|UNLIMITED|unlimited)$")
# An extra #SBATCH line: one long option, no newline (it is written into the batch script as is).
_SBATCH_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[^\n\r]*)?$")
# sbatch options extra_sbatch may not give: the daemon sets them itself (name, output, folder, signal, size,
# requeue), or they break what it relies on: one job per attempt (--array), an answer at once (--wait, --hold,
# --test-only, --parsable), a job it can watch without -M (--clusters), its own script (--wrap).
REFUSED_SBATCH = ("array", "wait", "clusters", "ntasks", "ntasks-per-node", "ntasks-per-core", "ntasks-per-socket",
                  "ntasks-per-gpu", "nodes", "signal", "requeue", "no-requeue", "open-mode", "hold", "test-only",
                  "parsable", "wrap", "job-name", "output", "error", "chdir")


def gpus_per_job_value(v):
    if v == "all":
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    raise ValueError("must be `all` (a job takes every GPU of `gpus`, one job at a time) or a number of GPUs like 1")


GpusPerJob = Annotated[Union[Literal["all"], int], BeforeValidator(gpus_per_job_value),
                       Field(json_schema_extra={"allowed": "all, or a number of GPUs per job like 1"})]


class SlurmConfig(BaseModel):
    """How a job is submitted with `executor: slurm`. Each job is one batch job; its ranks are started by srun."""

    model_config = ConfigDict(extra="forbid")

    partition: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.,-]+$")] | None = None
    account: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    qos: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    time_limit: Annotated[str, Field(pattern=_TIME.pattern)] | None = None  # sbatch --time
    nodes: Count = 1
    # Processes per node (one per GPU on GPU nodes). None: gpus_per_node if set, else cpu_processes.
    tasks_per_node: Count | None = None
    gpus_per_node: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=64)] = 0  # --gpus-per-node; 0: no GPU
    cpus_per_task: Count | None = None
    mem: Annotated[str, Field(pattern=r"^\d+[KMGT]?$")] | None = None  # sbatch --mem, per node
    extra_sbatch: list[Annotated[str, Field(pattern=_SBATCH_OPTION.pattern)]] = []  # e.g. --constraint=h100
    # Let Slurm requeue the job on preemption or node failure (sbatch --requeue); the rerun resumes from the
    # last checkpoint. False: such an end is a failed attempt, retried by the daemon like any other.
    requeue: bool = True
    python: Annotated[str, Field(min_length=1)] | None = None  # the interpreter on the nodes; None: sys.executable
    poll_seconds: Annotated[float, BeforeValidator(_not_bool), Field(ge=0.2, le=300)] = 5.0  # squeue/sacct pace
    command_timeout_seconds: Annotated[float, BeforeValidator(_not_bool), Field(ge=1, le=600)] = 30.0  # per command

    @field_validator("extra_sbatch")
    @classmethod
    def _no_owned_options(cls, v):
        bad = [line for line in v if refused_option(line)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not allowed here (the daemon sets or forbids "
                             f"{', '.join('--' + o for o in REFUSED_SBATCH)})")
        return v


def refused_option(line: str) -> str | None:
    """The refused option an extra_sbatch line names, or None. sbatch (getopt_long) takes any unambiguous
    prefix of a long option (`--ou=x` is --output), so a prefix of two or more letters counts too."""
    given = line[2:].split("=")[0].lower()
    for option in REFUSED_SBATCH:
        if given == option or (len(given) >= 2 and option.startswith(given)):
            return option
    return None


def time_limit_seconds(text: str) -> int | None:
    """sbatch --time in seconds (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for UNLIMITED."""
    if text.lower() == "unlimited":
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def time_limit_problem(cfg) -> str | None:
    """A slurm.time_limit too short for one run to do anything: Slurm's warm stop comes stop_timeout + 60 s
    before it, and loading may take start_timeout; such a job would be resubmitted without ever progressing."""
    if cfg.executor != "slurm" or not cfg.slurm.time_limit:
        return None
    limit = time_limit_seconds(cfg.slurm.time_limit)
    lim = cfg.limits
    need = lim.stop_timeout_seconds + 60 + lim.start_timeout_seconds
    if limit is None or limit > need:
        return None
    return (f"{cfg.slurm.time_limit} is {limit} s: it must be longer than limits.stop_timeout_seconds "
            f"({lim.stop_timeout_seconds:g} s) + 60 s (Slurm's warm stop comes that long before the limit) + "
            f"limits.start_timeout_seconds ({lim.start_timeout_seconds:g} s) = {need:g} s")
