"""The next job's trainer, started before the job exists.

A trainer spends most of its start in imports: torch, transformers, peft took 10-14 s on the H100 host
(docs/performance.md), more than the whole training of a small file. So on a GPU host the daemon starts the
next trainer as soon as the last one has exited and its GPU memory is checked: `daemon.trainer.main --standby`
imports the training stack, touches no GPU, and waits for one JSON line on stdin that names its job. In every
other way it is the trainer the daemon would start for that job: a child of the daemon in a process group
of its own, holding the lifeline, its devices' trainer locks and PR_SET_PDEATHSIG. A standby that died while idle, or
one started for other GPUs than the job's, is dropped and the job's trainer is started the ordinary way.
No torch here: the daemon imports this.
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


def early_grant(cfg) -> launch.Grant | None:
    """What the next job's trainer would run on, if it is to be started early: None when trainer_prestart is
    off ("auto": on a GPU host only), when the config's GPUs are not there (the queue is blocked with the reason),
    or when the job takes several processes (an early trainer is one)."""
    visible = gpu.visible_devices()
    if not (cfg.trainer_prestart == "true" or (cfg.trainer_prestart == "auto" and visible)):
        return None
    try:
        grant = launch.grant(cfg.gpus, cfg.cpu_processes, visible)
    except UserError:
        return None
    return grant if grant.processes == 1 else None


def start_early(layout, grant: launch.Grant, status) -> "Standby | None":
    """The next job's trainer, started now (the caller checked the trainer lock is free); None if it could not
    be (said in status.log: the job's trainer will then be started the ordinary way)."""
    try:
        standby = Standby.start(layout.root, layout.state, grant)
    except (OSError, RuntimeError) as e:
        status.event("standby", f"could not start the next trainer early: {e}", level="warning")
        return None
    status.event("standby", f"next trainer started early (pid {standby.pid})", level="debug", pid=standby.pid)
    return standby


class Standby:
    def __init__(self, ranks: launch.Ranks, life_w: int, grant: launch.Grant):
        self.ranks, self.life_w, self.grant = ranks, life_w, grant

    @classmethod
    def start(cls, root: Path, state_dir: Path, grant: launch.Grant) -> "Standby":
        """Start it, holding the trainer locks of its grant (the caller checked that they are free); its log is
        state/standby.log. Only in single-slot mode: its CPU slot is "cpu0"."""
        lock_fds = launch.acquire_trainer_lock(state_dir, launch.lock_names(grant, SLOT))
        try:
            life_r, life_w = os.pipe()
        except BaseException:
            for fd in lock_fds:  # a lost lock fd would keep every later trainer waiting
                os.close(fd)
            raise
        cmd = [sys.executable, "-m", "daemon.trainer.main", "--standby", "--root", str(root),
               "--lifeline-fd", str(life_r), "--parent-pid", str(os.getpid())]
        try:
            with open(state_dir / "standby.log", "ab") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        pass_fds=(life_r, *lock_fds), cwd=str(root), process_group=0,
                                        env=launch.rank_env(launch.trainer_env(), grant, 0, 0))
        except BaseException:
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
            for fd in lock_fds:
                os.close(fd)
        return cls(launch.Ranks([proc]), life_w, grant)

    @property
    def pid(self) -> int:
        return self.ranks.pid

    def usable_for(self, grant: launch.Grant) -> bool:
        return self.ranks.poll() is None and grant == self.grant

    def take(self, job_dir: Path, micro_batch: int | None) -> tuple[launch.Ranks, int]:
        """Hand it its job; it becomes the job's trainer. Returns it and the lifeline's write end, which the
        caller now owns (closing it tells the trainer the daemon is gone)."""
        proc = self.ranks.procs[0]
        proc.stdin.write((json.dumps({"job_dir": str(job_dir), "micro_batch": micro_batch}) + "\n").encode())
        proc.stdin.close()  # BrokenPipeError if it died a moment ago: the caller drops it and starts one
        return self.ranks, self.life_w

    def discard(self, wait: float = 1.0) -> None:
        """End an idle standby: EOF on stdin makes it exit 0 once its imports are done; one still importing
        is killed (it holds nothing but the trainer lock, which its exit releases). Then reap it."""
        proc = self.ranks.procs[0]
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.ranks.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        os.close(self.life_w)
