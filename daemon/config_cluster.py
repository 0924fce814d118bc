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
        owned = ("--job-name", "--output", "--error", "--chdir", "--parsable", "--wrap")
        bad = [line for line in v if line.split("=")[0] in owned]
        if bad:
            raise ValueError(f"{', '.join(bad)}: set by the daemon itself ({', '.join(owned)})")
        return v
