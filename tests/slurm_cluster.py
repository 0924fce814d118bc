"""A real one-node Slurm cluster (munged, slurmctld, slurmd) started for the test session in a temporary folder.

The Slurm executor must be tested against the real sbatch/squeue/scancel/scontrol/srun, not a mock: what a
signal reaches, what an ended job looks like, and which exit code Slurm reports are exactly what a mock would
get wrong. Nothing here touches the machine's own Slurm or munge set-up (/etc/slurm, /etc/munge, /run/munge):
every daemon gets its own key, socket, ports, state and logs under one short folder, found by the clients
through SLURM_CONF. Without the programs, or when the cluster does not come up, the Slurm tests skip with the
reason (the tail of the daemon logs), never fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
# More CPUs than the machine has (slurmd reports the configured ones: config_overrides): with CR_CPU, several
# jobs of several tasks each share the node at once, as the multi-job tests need on a 2-core CI machine.
NODE_CPUS = 8
PARTITION = "debug"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0


@dataclass
class SlurmCluster:
    """The running cluster: pass `.env` to a daemon subprocess so its Slurm commands reach this cluster."""

    dir: Path
    conf_path: Path
    node: str
    partition: str = PARTITION
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster, its output as text."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def sbatch_wrap(self, cmd: str, *options: str, cwd: str | Path | None = None) -> str:
        """Submit `cmd` as a batch script (sbatch --wrap); returns the job id."""
        args = ["sbatch", "--parsable", f"--partition={self.partition}", *options, f"--wrap={cmd}"]
        out = subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True, check=True,
                             timeout=30, cwd=cwd).stdout
        return out.strip().split(";")[0]  # --parsable: "id" or "id;cluster"

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode "rc:sig", Reason, ...); {} once Slurm forgot it."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return {}
        # "Key=value Key=value ...": a word without "=" continues the previous value (a path with a space).
        info: dict[str, str] = {}
        key = None
        for word in proc.stdout.split():
            name, sep, value = word.partition("=")
            if sep:
                key = name
                info[key] = value
            elif key is not None:
                info[key] += " " + word
        return info

    def wait_state(self, job_id: str, states: str | set[str] | tuple[str, ...], timeout: float = 30.0) -> dict:
        """Wait until the job's JobState is one of `states`; returns job_info, fails the test on timeout."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in wanted:
                return info
            time.sleep(0.2)
        raise AssertionError(f"Slurm job {job_id} not in {sorted(wanted)} after {timeout:.0f}s: {info}")

    def cancel_all(self, timeout: float = 15.0) -> None:
        """Cancel every job of the cluster and wait until none runs (a test's leftovers must not hold CPUs)."""
        self.run("scancel", f"--partition={self.partition}", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            if not out:
                return
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon's log: why the cluster did not come up."""
        parts = []
        for daemon in ("munged", "slurmctld", "slurmd"):
            # A daemon that died before opening its log file said why on stderr (.out); munged in the
            # foreground logs only there.
            for path in (self.dir / f"{daemon}.log", self.dir / f"{daemon}.out"):
                if path.exists() and path.stat().st_size:
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path.name}\n" + "\n".join(tail))
                    break
        return "\n".join(parts) or "(no daemon log)"


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_conf(cluster: SlurmCluster, ctld_port: int, slurmd_port: int) -> None:
    d = cluster.dir
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    # batch_sched_delay=0: a submitted job starts within a second, not on the next 3-second scheduling pass.
    # MinJobAge=600: `scontrol show job` still shows an ended job (state, ExitCode) for 10 minutes.
    # Without accounting, `sacct -c` reads ended jobs from the jobcomp/filetxt file.
    # Addresses are given (127.0.0.1): the host's name need not resolve (containers, CI runners).
    cluster.conf_path.write_text(f"""\
ClusterName=tdtest
SlurmctldHost={cluster.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
MinJobAge=600
KillWait=5
ReturnToService=2
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory=1000 State=UNKNOWN
PartitionName={cluster.partition} Nodes={cluster.node} Default=YES MaxTime=INFINITE State=UP
""")


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    """Start a daemon in the foreground, as our child: its pid is known and its exit is reaped."""
    out = open(cluster.dir / f"{name}.out", "wb")  # the child keeps its own copy of the fd
    cluster.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env={**os.environ, **cluster.env}, start_new_session=True)
    out.close()


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # A dead daemon first: asking a dead controller (sinfo) would only time out.
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: {', '.join(dead)} exited\n{cluster.log_tail()}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s\n{cluster.log_tail()}")
        time.sleep(0.1)


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        proc = cluster.run("sinfo", "-h", "-n", cluster.node, "-o", "%t", check=False, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "idle"


def _program(name: str) -> str | None:
    """The program's path; daemons live in /usr/sbin, which is not on every user's PATH."""
    path = shutil.which(name) or f"/usr/sbin/{name}"
    return path if os.access(path, os.X_OK) else None


def start_cluster(attempts: int = 3) -> SlurmCluster:
    """Start munged, slurmctld and slurmd; raises RuntimeError (with the logs' tails) if they do not come up."""
    missing = [p for p in PROGRAMS if _program(p) is None]
    if missing:
        raise FileNotFoundError(f"Slurm/munge not installed: {', '.join(missing)} missing")
    for attempt in range(attempts):
        try:
            return _start_once()
        except RuntimeError as exc:
            # The free ports were free when we looked; another test session may have taken one since.
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_once() -> SlurmCluster:
    # Short: munge's and slurmd's unix sockets live here (paths < 108 bytes). munged wants every folder on its
    # socket's path searchable by all, hence 0755.
    d = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    d.chmod(0o755)
    (d / "state").mkdir()
    (d / "spool").mkdir()
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(dir=d, conf_path=d / "slurm.conf", node=node)
    cluster.env = {"SLURM_CONF": str(cluster.conf_path)}
    try:
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)  # munged refuses a key others can read; we own it, as we run munged
        _start(cluster, "munged", [_program("munged"), "--foreground", f"--socket={d}/munge.sock",
                                   f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                                   f"--seed-file={d}/munged.seed"])
        _wait(cluster, "munged", lambda: (d / "munge.sock").exists(), 10)
        _write_conf(cluster, *_free_ports(2))
        _start(cluster, "slurmctld", [_program("slurmctld"), "-D", "-c", "-f", str(cluster.conf_path)])
        _start(cluster, "slurmd", [_program("slurmd"), "-D", "-f", str(cluster.conf_path), "-N", node])
        _wait(cluster, "Slurm node idle", lambda: _node_idle(cluster), START_TIMEOUT)
    except BaseException:
        stop_cluster(cluster)  # the reason, with the logs' tails, is in the exception
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster, remove: bool = True) -> None:
    """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL): nothing left running."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        cluster.cancel_all(timeout=10)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    if remove:
        shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """One Slurm cluster shared by every Slurm test of the session; SLURM_CONF points the clients at it."""
    try:
        cluster = start_cluster()
    except (FileNotFoundError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no Slurm cluster: {exc}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf_path))
        try:
            yield cluster
        finally:
            stop_cluster(cluster)
