"""Waiting for an exclusive flock with a deadline: the control commands' turn and an adapter's `latest` lock."""

from __future__ import annotations

import fcntl
import time

from daemon.paths import UserError


def lock_within(fd: int, wait: float, message: str, poll: float = 0.05) -> None:
    """Take an exclusive flock on `fd`, waiting at most `wait` seconds; UserError(message) if it does not come."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UserError(message) from None
            time.sleep(poll)
