"""One flock per device (state/trainer-gpu<N>.lock, state/trainer-cpu<N>.lock for a CPU slot): never two
trainers on one device, across daemon restarts too. The daemon takes them for a trainer it starts (the ranks
inherit the fds); an early trainer takes them itself once it has the go (daemon/trainer/main.py). Shared by both
processes, so no torch here and nothing of the daemon's.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


def lock_file(name: str) -> str:
    """state/trainer-<name>.lock: held by every rank of the trainer that runs there, until it exits."""
    return f"trainer-{name}.lock"


def acquire_trainer_lock(state_dir: Path, names: list[str], wait: float = 60,
                         holder: str = "a trainer from an earlier daemon") -> list[int]:
    """Never two trainers on one device: the fds of the grant's locks (lock_names), locked, for the next trainer
    to inherit. Waits for a trainer left by a dead daemon (its lifeline makes it exit); RuntimeError naming
    `holder` (who may hold it, for the message) if it has not after `wait` s (the locks taken so far are let go)."""
    fds: list[int] = []
    deadline = time.monotonic() + wait
    try:
        for name in names:
            fd = os.open(state_dir / lock_file(name), os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{holder} still holds state/{lock_file(name)} after {wait:.0f} s"
                                           ) from None
                    time.sleep(0.2)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def held_trainer_lock(state_dir: Path, names: list[str]) -> str | None:
    """The first of these locks a trainer holds now, as state/<file>, or None when all are free (a probe: it
    takes each lock and lets go at once)."""
    for name in names:
        fd = os.open(state_dir / lock_file(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"state/{lock_file(name)}"
        finally:
            os.close(fd)  # closing drops the probe's lock
    return None
