"""How the daemon starts a job's trainer: one process per granted GPU (or N gloo processes on CPU), one group.

The daemon is the launcher, not torchrun: each rank gets the environment torchrun gives its workers (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), so `accelerate.Accelerator()` in the trainer sets up the
process group exactly as under `torchrun` or `accelerate launch`. torchrun's agent would sit between the
daemon and the ranks and start every worker in a session of its own (torch 2.13,
`SubprocessHandler._popen`): a warm stop (SIGUSR1) would reach the agent, not the ranks, and by default
kill it; killpg of the agent's group would miss the workers; and the workers would inherit neither the
lifeline pipe (Popen closes fds) nor a death signal tied to the daemon. Here rank 0 leads a new process
group and every other rank joins it, each holds the lifeline and its devices' trainer locks, and all are the
daemon's own children. No torch in this module: the daemon imports it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from daemon import protocol
from daemon.paths import PROJECT_DIR, UserError
from daemon.device_locks import acquire_trainer_lock, held_trainer_lock, lock_file  # noqa: F401 (the API)
from daemon.protocol import log_name

# Set for a multi-process job only; a single-process trainer must not inherit any from the daemon's own
# environment and believe it is one rank of many.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Grant:
    """What one job runs on: how many processes, and the CUDA_VISIBLE_DEVICES entries they share."""

    processes: int
    devices: tuple[str, ...] | None  # None: no GPU seen; the environment's own CUDA settings stay as they are

    def describe(self) -> str:
        if self.devices is None:
            return "CPU" if self.processes == 1 else f"{self.processes} CPU processes (gloo)"
        gpus = ", ".join(self.devices)
        return f"GPU {gpus}" if self.processes == 1 else f"{self.processes} processes on GPUs {gpus}"


def grant(gpus, cpu_processes: int, visible: list[str] | None) -> Grant:
    """The config's `gpus` (all | a count | indices) against the GPUs the daemon sees; UserError if it asks
    for GPUs that are not there. `visible`: CUDA_VISIBLE_DEVICES-style entries, None or [] when none."""
    if not visible:
        if gpus != "all":  # asked for GPUs by number: training on the CPU (or on whatever CUDA picks) is not that
            raise UserError(f"gpus: {gpus} asked for, but the daemon sees no GPU"
                            + (" (NVML is not available: pip install nvidia-ml-py)" if visible is None else ""))
        return Grant(cpu_processes, None)
    if gpus == "all":
        chosen = list(visible)
    elif isinstance(gpus, int):
        if gpus > len(visible):
            raise UserError(f"gpus: {gpus} asked for, but only {len(visible)} visible ({', '.join(visible)})")
        chosen = list(visible[:gpus])
    else:
        missing = [i for i in gpus if str(i) not in visible]
        if missing:
            raise UserError(f"gpus: GPU {', '.join(map(str, missing))} not visible to the daemon "
                            f"(visible: {', '.join(visible)})")
        chosen = [str(i) for i in gpus]
    return Grant(len(chosen), tuple(chosen))


def free_port() -> int:
    """A port nobody listens on now, for rank 0 to bind seconds later (once torch is imported).

    Chosen below the kernel's range of ephemeral ports, which every outgoing connection on the host (gloo's
    and NCCL's own among them) draws from: there only an explicit bind can take it first. A lost race fails
    the attempt, which is retried.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    below = range(max(1024, ephemeral_low - 10000), ephemeral_low)
    candidates = random.sample(below, min(20, len(below)))
    for port in candidates + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port for the ranks' rendezvous")


def rank_env(base: dict, g: Grant, rank: int, port: int) -> dict:
    """The environment of one rank, as torchrun would give it (single node)."""
    env = {k: v for k, v in base.items() if k not in DIST_VARS}
    if g.devices is not None:
        # Every rank sees every granted GPU and takes cuda:LOCAL_RANK (as under torchrun), numbered as
        # nvidia-smi and NVML number them, so the grant and the daemon's GPU readings name the same cards.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g.devices)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if g.processes > 1:
        n = str(g.processes)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=n, LOCAL_WORLD_SIZE=n, GROUP_RANK="0",
                   ROLE_RANK=str(rank), ROLE_WORLD_SIZE=n, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: N ranks must not each start a thread per core
    return env


def trainer_env() -> dict:
    """The daemon's environment, with this project importable and the trainer's stdout unbuffered (events)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1")


def lock_names(grant: Grant, slot: str) -> list[str]:
    """The trainer locks a grant takes: one per GPU ("gpu<entry>"), or its CPU slot's ("cpu0", ...)."""
    if grant.devices is not None:
        return [f"gpu{d}" for d in grant.devices]
    return [slot]


def trainer_command(job_dir: Path, root: Path, lifeline_fd: int, parent_pid: int, micro_batch: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "daemon.trainer.main", str(job_dir), "--root", str(root),
           "--lifeline-fd", str(lifeline_fd), "--parent-pid", str(parent_pid)]
    if micro_batch:
        cmd += ["--micro-batch", str(micro_batch)]
    return cmd


def job_exit_code(codes: list[int], collateral: set[int]) -> int:
    """One exit status for the job from its ranks' statuses.

    `collateral`: ranks the daemon itself killed (a cold stop, or the rest of the group after one rank
    failed); they say nothing about the cause. Of the others, the most telling failure wins: out of
    memory, disk full and bad input first (each names its cause), then a rank killed by a signal,
    then any other failure; else stopped, else done. All collateral: rank 0's status (killed).
    """
    own = [c for r, c in enumerate(codes) if r not in collateral]
    if not own:
        return codes[0]
    failures = [c for c in own if c not in (protocol.DONE, protocol.STOPPED)]
    if 0 in collateral and not failures:
        # Rank 0 (the one that checkpoints and publishes) killed by the daemon while the others had finished:
        # the job did not finish, whatever they say.
        return codes[0]
    if failures:
        order = [protocol.OUT_OF_MEMORY, protocol.DISK_FULL, protocol.BAD_INPUT]
        return min(failures, key=lambda c: order.index(c) if c in order else 3 if c < 0 else 4)
    return protocol.STOPPED if protocol.STOPPED in own else protocol.DONE


def describe_status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a realtime signal has a number but no name
            name = None
        return f"signal {-code} ({name})" if name else f"signal {-code}"
    return f"status {code} ({protocol.NAMES.get(code, 'failed')})"


class Ranks:
    """A job's rank processes as one: rank 0 leads a new process group, the other ranks join it.

    Shaped like the Popen it replaces: `stdout` is rank 0's (only rank 0 reports events), `poll`/`wait`
    give the job's exit status once every rank has exited.
    """

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.collateral: set[int] = set()
        self._failure_seen = False

    @property
    def pid(self) -> int:
        return self.procs[0].pid  # also the process group id

    @property
    def stdout(self):
        return self.procs[0].stdout

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.procs]
        return None if None in codes else job_exit_code(codes, self.collateral)

    def wait(self) -> int:
        return job_exit_code([p.wait() for p in self.procs], self.collateral)

    def send_signal(self, sig: int) -> None:
        """To every rank still running (not the group: a rank's own helpers keep their default handlers)."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL to the whole group: every rank and anything they started."""
        running = {r for r, p in enumerate(self.procs) if p.poll() is None}
        if not running:
            return
        self.collateral |= running
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def failed_rank(self) -> tuple[int, int] | None:
        """(rank, status) of a rank that failed while others still run, once: the others must not wait in a
        collective for a peer that is gone, so the daemon stops the group."""
        if self._failure_seen or len(self.procs) == 1:
            return None
        codes = [p.poll() for p in self.procs]
        if None not in codes:
            return None
        for rank, code in enumerate(codes):
            if code is not None and code not in (protocol.DONE, protocol.STOPPED):
                self._failure_seen = True
                return rank, code
        return None


def start(cmd: list[str], g: Grant, base_env: dict, job_dir: Path, *, pass_fds: tuple[int, ...], cwd: Path) -> Ranks:
    """Start every rank of a job; rank 0's stdout is a pipe for its events, each rank's stderr its own log.
    OSError if rank 0 cannot be started (its interpreter or the project gone)."""
    port = free_port() if g.processes > 1 else 0
    procs: list[subprocess.Popen] = []
    for rank in range(g.processes):
        # One group in the daemon's session (setpgid cannot join a group of another session, so no setsid).
        group = procs[0].pid if procs else 0
        with open(job_dir / log_name(rank), "ab") as log:
            try:
                procs.append(subprocess.Popen(
                    cmd, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=log,
                    stdin=subprocess.DEVNULL, pass_fds=pass_fds, env=rank_env(base_env, g, rank, port),
                    cwd=str(cwd), process_group=group))
            except (OSError, subprocess.SubprocessError) as e:
                if not procs:
                    raise
                # Rank 0 is already gone (its group with it): end what started; the job fails and is retried.
                log.write(f"rank {rank} could not start: {e}\n".encode())
                ranks = Ranks(procs)
                ranks.kill()
                return ranks
    return Ranks(procs)
