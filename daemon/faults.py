"""Fault hooks: inject failures that cannot be caused on demand (CUDA OOM on a CPU machine, a kill at an
exact step, a full disk, a lost inotify event) without replacing the code path under test.

Set TRAINING_DAEMON_FAULTS to a JSON list of faults; the trainer child inherits it from the daemon:

    [{"point": "train_step", "kind": "oom", "step": 2, "micro_batch_gt": 1},
     {"point": "checkpoint_write", "kind": "kill", "step": 4, "once_file": "/tmp/fired"}]

Points in the trainer: trainer_start (before its stop handler is set), validate, load, train_step,
checkpoint_save, checkpoint_write, judge (measuring the new version), judge_incumbent (measuring `latest`),
publish, version_write, published. Points in the daemon: claim, job_start,
job_end, watch_event, sbatch (kind timeout: sbatch's answer lost after Slurm took the job), slurm_published_reported
(a Slurm job's published/held event reported). docs/reliability.md says where each one sits. kind: oom (raises
torch.OutOfMemoryError; MemoryError in a process without torch), error (RuntimeError), kill (SIGKILL to its own
process), enospc (OSError ENOSPC), hang (sleeps until killed), sleep (sleeps `seconds`, then goes on), nan (a
non-finite loss, train_step only), drop (the event is lost, watch_event only), timeout (sbatch only).
Conditions, all optional: step (fires when step == N), min_step (step >= N), micro_batch_gt (only while the
micro-batch is larger than N, so an OOM retry with a smaller one succeeds), job_id, once_file (fires only if
that file does not exist yet, and creates it: "once" across processes and restarts).
Unset, every hook is a dictionary lookup that returns at once.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

ENV = "TRAINING_DAEMON_FAULTS"
_PASSIVE = ("nan", "drop")  # the caller acts on these itself, through active()
_context: dict = {}


def set_context(**kw) -> None:
    """Facts the conditions can test (micro_batch, job_id), set once by the trainer."""
    _context.update(kw)


def _faults() -> list[dict]:
    raw = os.environ.get(ENV)
    if not raw:
        return []
    try:
        faults = json.loads(raw)
    except ValueError:
        return []
    return faults if isinstance(faults, list) else [faults]


def _matches(f: dict, point: str, step: int | None, job_id: int | None) -> bool:
    if f.get("point") != point:
        return False
    if "step" in f and step != f["step"]:
        return False
    if "min_step" in f and (step is None or step < f["min_step"]):
        return False
    if "micro_batch_gt" in f and not _context.get("micro_batch", 0) > f["micro_batch_gt"]:
        return False
    if "job_id" in f and (job_id if job_id is not None else _context.get("job_id")) != f["job_id"]:
        return False
    once = f.get("once_file")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            return False
    return True


def _out_of_memory_type() -> type[BaseException]:
    """torch's OOM type where torch is loaded (the trainer, which catches exactly that), MemoryError elsewhere.
    Taken from sys.modules, never imported: this module is in the shared core, and the daemon must not load torch."""
    return getattr(sys.modules.get("torch"), "OutOfMemoryError", MemoryError)


def active(point: str, step: int | None = None, kind: str = "nan", job_id: int | None = None) -> bool:
    """True when a passive fault (nan, drop) for this point is due: the caller corrupts or drops its own value."""
    return any(f.get("kind") == kind and _matches(f, point, step, job_id) for f in _faults())


def check(point: str, step: int | None = None, job_id: int | None = None) -> None:
    """Fire the active faults due at this point. The daemon passes job_id; the trainer sets it in the context."""
    for f in _faults():
        if f.get("kind") in _PASSIVE or not _matches(f, point, step, job_id):
            continue
        kind = f.get("kind")
        where = f"{point} step {step}" if step is not None else point
        if kind == "oom":
            raise _out_of_memory_type()(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected fault at {where})")
        if kind == "error":
            raise RuntimeError(f"injected fault at {where}")
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected fault at {where})")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "sleep":
            time.sleep(float(f.get("seconds", 1)))
