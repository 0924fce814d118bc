"""Which pending jobs start now, and where: the placement rules of several jobs at once on one host.

The pool is the devices `gpus` grants; a job takes `gpus_per_job` of them (its adapter's value; `all`: the whole
pool, today's one job at a time). Without GPUs the pool is `max_parallel_jobs or 1` CPU slots ("cpu0", ...),
each a job of `cpu_processes` gloo processes. With `executor: slurm` the jobs need no local device: only
max_parallel_jobs (4 by default) bounds them.

Three rules, in this order, make the choice (next_jobs):
- jobs are taken in arrival (id) order, and a job of an adapter that has a job running, or an earlier pending
  job that was passed over, is passed over too: a later job of an adapter never overtakes an earlier one, so
  the versions it publishes keep the order the files came in;
- the first job that may start but does not fit the free devices stops the choice (no backfill): a job that
  needs many GPUs is never starved by a stream of small ones;
- at most max_parallel_jobs run.
A job that could never fit (gpus_per_job above the pool's size) is not a wait: it fails as a bad config, named.
Pure functions, no I/O: the loop asks, then starts what it is told.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.supervisor.launch import Grant

SLURM_DEFAULT_PARALLEL = 4


@dataclass(frozen=True)
class Pool:
    """What jobs may be placed on: GPU entries (CUDA_VISIBLE_DEVICES style), or CPU/Slurm slot names."""

    units: tuple[str, ...]  # the GPU entries, or the slot names ("cpu0", "slurm0", ...)
    gpus: bool  # whether the units are GPUs (a job takes gpus_per_job of them) or slots (a job takes one)
    limit: int  # most jobs at once
    cpu_processes: int = 1
    executor: str = "local"

    @classmethod
    def of(cls, devices: tuple[str, ...] | None, *, cpu_processes: int, max_parallel: int | None,
           executor: str = "local") -> "Pool":
        """The pool from the grant of `gpus` (its devices; None without GPUs) and the config's limits."""
        if executor == "slurm":
            n = max_parallel or SLURM_DEFAULT_PARALLEL
            return cls(tuple(f"slurm{i}" for i in range(n)), False, n, cpu_processes, executor)
        if devices:
            return cls(tuple(devices), True, max_parallel or len(devices), cpu_processes)
        n = max_parallel or 1
        return cls(tuple(f"cpu{i}" for i in range(n)), False, n, cpu_processes)

    def need(self, gpus_per_job) -> int:
        """How many units a job takes: its gpus_per_job of a GPU pool (`all`: every GPU), else one slot."""
        if not self.gpus:
            return 1  # on the CPU (or Slurm) a job is one slot; gpus_per_job speaks of GPUs only
        return len(self.units) if gpus_per_job == "all" else int(gpus_per_job)

    @property
    def single(self) -> bool:
        """Only one job can run at a time here (today's mode, where the early trainer is used)."""
        return self.limit == 1


@dataclass(frozen=True)
class Candidate:
    """A pending job, as placement sees it."""

    job_id: int
    adapter: str
    gpus_per_job: object = "all"  # its adapter's value: "all" or a count
    # Not to be started yet, and its adapter's later jobs wait behind it: a duplicate whose original has not ended
    # (intake decides, once it has, whether it is done as a duplicate or trained).
    held: bool = False


@dataclass(frozen=True)
class Taken:
    """A running job: its adapter and the units it holds."""

    adapter: str
    units: tuple[str, ...]


@dataclass(frozen=True)
class Start:
    """Start this job now, on `grant`, in slot `slot` (e.g. "gpu0", "gpu0,1", "cpu1", "slurm0")."""

    job_id: int
    grant: Grant
    slot: str
    units: tuple[str, ...]


@dataclass(frozen=True)
class Misfit:
    """This job can never run on this pool: it fails as a bad config, with why."""

    job_id: int
    message: str


def slot_name(pool: Pool, units: tuple[str, ...]) -> str:
    return "gpu" + ",".join(units) if pool.gpus else units[0]


def next_jobs(pending: list[Candidate], running: dict[int, Taken], pool: Pool) -> list[Start | Misfit]:
    """Which pending jobs start now and where, by the rules above; Misfit for a job that never fits."""
    taken = {u for t in running.values() for u in t.units}
    free = [u for u in pool.units if u not in taken]
    busy = {t.adapter for t in running.values()}  # adapters with a job running or passed over
    room = pool.limit - len(running)
    out: list[Start | Misfit] = []
    for cand in sorted(pending, key=lambda c: c.job_id):
        if cand.adapter in busy or cand.held:
            busy.add(cand.adapter)
            continue
        n = pool.need(cand.gpus_per_job)
        if n > len(pool.units):
            out.append(Misfit(cand.job_id, misfit_message(cand, pool)))
            continue
        if room <= 0 or n > len(free):
            break  # no backfill: the jobs behind it wait for it
        units, free = tuple(free[:n]), free[n:]
        grant = Grant(n, units) if pool.gpus else Grant(pool.cpu_processes, None)
        out.append(Start(cand.job_id, grant, slot_name(pool, units), units))
        busy.add(cand.adapter)
        room -= 1
    return out


def misfit_message(cand: Candidate, pool: Pool) -> str:
    return (f"gpus_per_job: {cand.gpus_per_job} (adapter {cand.adapter}) asks for more GPUs than the daemon may "
            f"use: {len(pool.units)} GPU(s) ({', '.join(pool.units)}) granted by `gpus`; lower gpus_per_job or "
            "grant more GPUs")


def describe_slot(start: Start, pool: Pool) -> str:
    """Where a job trains, for its `started` status line."""
    if pool.executor == "slurm":
        return "on Slurm"
    if pool.gpus:
        return ("on GPU " if len(start.units) == 1 else "on GPUs ") + ", ".join(start.units)
    return f"on {start.slot}"
