"""Slurm's commands as the Slurm executor (slurm.py) uses them: each run with a timeout, their answers parsed, and
the cheap check the gate asks before jobs start (problem). No torch here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

GONE = "GONE"  # our name for a job Slurm no longer knows (purged after MinJobAge, no accounting to ask)
# Once one command timed out, Slurm is taken as unresponsive until this (time.monotonic()): the other handles skip
# their poll meanwhile, so N jobs cannot hold the one loop for N timeouts in a row (systemd's watchdog is 60 s).
_unresponsive_until = 0.0


class SlurmUnavailable(Exception):
    """A Slurm command could not be run or did not answer: the message says which and why."""


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A Slurm command; SlurmUnavailable when it is not on PATH or does not answer in time."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmUnavailable(f"{args[0]} not found on PATH (is Slurm installed on this host?)") from None
    except subprocess.TimeoutExpired:
        global _unresponsive_until
        _unresponsive_until = time.monotonic() + timeout
        raise SlurmUnavailable(f"{args[0]} did not answer in {timeout:.0f}s") from None
    except OSError as e:
        raise SlurmUnavailable(f"{args[0]} could not be run: {e}") from None


def unresponsive() -> bool:
    """A Slurm command timed out a moment ago (within its own timeout): polls wait, the next one asks again."""
    return time.monotonic() < _unresponsive_until


def jobs_named(names: list[str], timeout: float) -> list[tuple[str, str]] | None:
    """(id, state) of every job Slurm knows by these names (squeue -t all -n), oldest first; None when Slurm did
    not answer, which is not the same as "no such job" (an empty list)."""
    try:
        r = run(["squeue", "-h", "-t", "all", "-n", ",".join(names), "-o", "%i %T"], timeout)
    except SlurmUnavailable:
        return None
    if r.returncode != 0:
        return None
    rows = [line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2]
    return sorted(((i, state) for i, state in rows), key=lambda row: int(row[0]) if row[0].isdigit() else 0)


def problem(cfg) -> str | None:
    """What would make every submission fail now (gate.problem asks it): Slurm's commands missing, the controller
    not answering, the configured partition unknown. One cheap `sinfo`."""
    for command in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(command) is None:
            return f"Slurm: {command} not found on PATH (executor: slurm needs Slurm's commands on the daemon's host)"
    try:
        r = run(["sinfo", "-h", "-o", "%P"], cfg.slurm.command_timeout_seconds)
    except SlurmUnavailable as e:
        return f"Slurm: {e}"
    if r.returncode != 0:
        return f"Slurm: sinfo failed: {last_line(r.stderr) or f'status {r.returncode}'}"
    known = {p.strip().rstrip("*") for p in r.stdout.split()}
    wanted = [p for p in (cfg.slurm.partition or "").split(",") if p]
    missing = [p for p in wanted if p not in known]
    if missing:
        return (f"Slurm: partition {', '.join(missing)} does not exist (slurm.partition; partitions: "
                f"{', '.join(sorted(known)) or 'none'})")
    return None


def job_info(slurm_id: str, timeout: float) -> dict | None:
    """`scontrol show job -o` as a dict; None when Slurm no longer knows the job (then sacct, if it keeps one)."""
    r = run(["scontrol", "show", "job", "-o", slurm_id], timeout)
    if r.returncode == 0 and r.stdout.strip():
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout.strip().splitlines()[0]))
    if "Invalid job id" not in r.stderr:
        raise SlurmUnavailable(f"scontrol show job {slurm_id}: {last_line(r.stderr) or f'status {r.returncode}'}")
    try:
        a = run(["sacct", "-n", "-X", "-P", "-j", slurm_id, "-o", "State,ExitCode,Reason"], timeout)
    except SlurmUnavailable:
        return None
    rows = [line.split("|") for line in a.stdout.splitlines() if line.strip()] if a.returncode == 0 else []
    if not rows:
        return None
    state, exit_code, reason = (rows[-1] + ["", "", ""])[:3]
    return {"JobState": state.split()[0] if state else GONE, "ExitCode": exit_code, "Reason": reason or None}


def rank_statuses(job_dir: Path) -> dict[int, dict]:
    """The ranks' exit files, by rank, of the latest run only (the batch script clears them as a run starts;
    the restart count the ranks wrote guards against a leftover)."""
    out: dict[int, dict] = {}
    for path in job_dir.glob("slurm-rank*.exit"):
        try:
            data = json.loads(path.read_text())
            rank = int(data["rank"])
            int(data["code"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[rank] = data
    latest = max((int(d.get("restart_count") or 0) for d in out.values()), default=0)
    return {r: d for r, d in out.items() if int(d.get("restart_count") or 0) == latest}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
