"""The next job's trainer, started before the job exists, and prepared before the GPU is free.

A trainer spends most of its start in imports (torch, transformers, peft: 10-20 s on a GPU host,
docs/performance.md), then validates and tokenizes its file: more than the whole training of a small file. So
when one job runs at a time (today's mode, trainer_prestart on) the daemon keeps the next trainer started:
`daemon.trainer.main --standby` imports the training stack, touches no GPU, and waits for one JSON line on stdin
that names its job. It is started when the daemon is idle and again as soon as a job has been handed one, so
it imports while that job trains; the next pending job is handed to it at once, even while another job trains
(the job moves to running/ with its attempt written down; phase "waiting_for_gpu"). It then prepares what needs
only the CPU (config, validation, tokenization, report.json) and waits at its GPU gate: a second line, the go
({"go": true, "locks": [...]}), which the daemon writes only once no other trainer is past its gate and the
previous job's GPU check is done (attempts.go_if_free). Only after the go does it take its devices' trainer locks
(by name, a bounded wait), decide what depends on the adapter's previous job, load and train. So a waiting
trainer holds no device lock and no CUDA context, and never two trainers are on the GPU.

In every other way it is the trainer the daemon would start for that job: a child of the daemon in a process
group of its own, holding the lifeline and PR_SET_PDEATHSIG. A standby that died while idle, or one started for
other GPUs than the job's, is dropped and the job's trainer is started the ordinary way (once the GPU is free).
A job of several ranks (several GPUs, or cpu_processes on the CPU) gets an early trainer of as many processes,
started as launch.start starts a job's ranks; each rank prepares, waits for its own go line, and they join their
process group only after it. No torch here: the daemon imports this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon.paths import UserError
from daemon.supervisor import gpu, launch

SLOT = "cpu0"  # the early trainer is used only when one job runs at a time: the one slot

# How many jobs may be prepared (handed to early trainers that wait at their GPU gate) while one trains. A
# trainer's imports start when it is started, one hand-over before it gets its own job; with small jobs the
# imports (~20 s on the H200 host with a 1.5B base) outlast a job's whole turn on the GPU (~8 s: loading,
# 200 examples, judging, publishing), so one prepared job would not hide them: three start importing three
# turns ahead. Each holds the imported stack and its tokenized file in RAM (~1-2 GB), no GPU memory.
PREPARED_AHEAD = 3


def early_grant(cfg) -> launch.Grant | None:
    """What the next job's trainer would run on, if it is to be started early: None when trainer_prestart is
    off ("auto": on a GPU host only) or when the config's GPUs are not there (the queue is blocked with the
    reason). Several processes (several GPUs, or cpu_processes) are an early trainer of several ranks."""
    visible = gpu.visible_devices()
    if not (cfg.trainer_prestart == "true" or (cfg.trainer_prestart == "auto" and visible)):
        return None
    try:
        return launch.grant(cfg.gpus, cfg.cpu_processes, visible)
    except UserError:
        return None


def start_early(layout, grant: launch.Grant, status) -> "Standby | None":
    """The next job's trainer, started now; None if it could not be (said in status.log: the job's trainer
    will then be started the ordinary way)."""
    try:
        standby = Standby.start(layout.root, layout.state, grant)
    except (OSError, RuntimeError) as e:
        status.event("standby", f"could not start the next trainer early: {e}", level="warning")
        return None
    status.event("standby", f"next trainer started early (pid {standby.pid})", level="debug", pid=standby.pid)
    return standby


def go(ranks: launch.Ranks, locks: list[str]) -> None:
    """The GPU gate opens for a trainer handed its job by take(): a go line to every rank, and their stdin
    closes (nothing more is said). Rank 0's names the trainer locks it takes (launch.lock_names) for the whole
    trainer (flock is per open file: the ranks cannot each take the same lock). OSError if a rank is gone."""
    error = None
    for rank, proc in enumerate(ranks.procs):
        try:
            proc.stdin.write((json.dumps({"go": True, "locks": locks if rank == 0 else []}) + "\n").encode())
            proc.stdin.flush()
        except OSError as e:
            error = error or e
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
    if error is not None:
        raise error


class Standby:
    def __init__(self, ranks: launch.Ranks, life_w: int, grant: launch.Grant):
        self.ranks, self.life_w, self.grant = ranks, life_w, grant

    @classmethod
    def start(cls, root: Path, state_dir: Path, grant: launch.Grant) -> "Standby":
        """Start it: one process per rank of `grant`, in one process group, each with the environment
        launch.rank_env gives a job's rank (its rendezvous port chosen now, bound only after the go); their
        logs are state/standby.log (rank 0), state/standby-rank<N>.log, until they have a job. It holds no
        trainer lock: rank 0 takes its devices' locks after the go (daemon/trainer/gpu_gate.py)."""
        life_r, life_w = os.pipe()
        cmd = [sys.executable, "-m", "daemon.trainer.main", "--standby", "--root", str(root),
               "--lifeline-fd", str(life_r), "--parent-pid", str(os.getpid())]
        procs: list[subprocess.Popen] = []
        try:
            port = launch.free_port() if grant.processes > 1 else 0
            for rank in range(grant.processes):
                name = "standby.log" if rank == 0 else f"standby-rank{rank}.log"
                with open(state_dir / name, "ab") as log:
                    procs.append(subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                        stderr=log, pass_fds=(life_r,), cwd=str(root),
                        process_group=procs[0].pid if procs else 0,
                        env=launch.rank_env(launch.trainer_env(), grant, rank, port)))
        except BaseException:
            if procs:
                launch.Ranks(procs).kill()
                for proc in procs:
                    proc.wait()
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
        return cls(launch.Ranks(procs), life_w, grant)

    @property
    def pid(self) -> int:
        return self.ranks.pid

    def usable_for(self, grant: launch.Grant) -> bool:
        return all(p.poll() is None for p in self.ranks.procs) and grant == self.grant

    def take(self, job_dir: Path, micro_batch: int | None) -> tuple[launch.Ranks, int]:
        """Hand it its job (every rank); it becomes the job's trainer, which prepares and then waits for go().
        Returns it and the lifeline's write end, which the caller now owns (closing it tells the trainer the
        daemon is gone). OSError (BrokenPipeError) if a rank died a moment ago: the caller drops it."""
        order = {"job_dir": str(job_dir), "micro_batch": micro_batch, "gated": True}
        for proc in self.ranks.procs:
            proc.stdin.write((json.dumps(order) + "\n").encode())
            proc.stdin.flush()
        return self.ranks, self.life_w

    def discard(self, wait: float = 1.0) -> None:
        """End an idle standby: EOF on stdin makes it exit 0 once its imports are done; one still importing
        is killed (it holds nothing). Then reap it."""
        for proc in self.ranks.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            for proc in self.ranks.procs:
                proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.ranks.kill()
            for proc in self.ranks.procs:
                proc.wait()
        if self.ranks.procs[0].stdout:
            self.ranks.procs[0].stdout.close()
        os.close(self.life_w)
