"""Fault hooks: inject failures that cannot be caused on demand (CUDA OOM on a CPU machine, a kill at an
exact step, a full disk) without replacing the code path under test.

Set TRAINING_DAEMON_FAULTS to a JSON list of faults; the trainer child inherits it from the daemon:

    [{"point": "train_step", "kind": "oom", "step": 2, "micro_batch_gt": 1},
     {"point": "checkpoint_save", "kind": "kill", "step": 4, "once_file": "/tmp/fired"}]

point: train_step | checkpoint_save | publish | validate | load (where the trainer calls `check`).
kind:  oom (raises torch.OutOfMemoryError), error (RuntimeError), kill (SIGKILL to itself), enospc
       (OSError ENOSPC), hang (sleeps until killed), nan (makes `active("nan_loss")` true: a non-finite loss).
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
import time

ENV = "TRAINING_DAEMON_FAULTS"
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


def _matches(f: dict, point: str, step: int | None) -> bool:
    if f.get("point") != point:
        return False
    if "step" in f and step != f["step"]:
        return False
    if "min_step" in f and (step is None or step < f["min_step"]):
        return False
    if "micro_batch_gt" in f and not _context.get("micro_batch", 0) > f["micro_batch_gt"]:
        return False
    if "job_id" in f and _context.get("job_id") != f["job_id"]:
        return False
    once = f.get("once_file")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            return False
    return True


def active(name: str, step: int | None = None) -> bool:
    """True when a `nan` fault for this point is due (the caller corrupts its own value)."""
    return any(f.get("kind") == "nan" and _matches(f, name, step) for f in _faults())


def check(point: str, step: int | None = None) -> None:
    for f in _faults():
        if f.get("kind") == "nan" or not _matches(f, point, step):
            continue
        kind = f.get("kind")
        where = f"{point} step {step}"
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected fault at {where})")
        if kind == "error":
            raise RuntimeError(f"injected fault at {where}")
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected fault at {where})")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
