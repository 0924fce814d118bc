"""One job's trainer, as the daemon holds it: started (or handed to the early trainer), its events, its stops,
its exit status.

The daemon's main loop polls this handle (poll_events, done, exit_status); nothing here calls back into the
daemon. Underneath: launch.py starts the ranks, standby.py keeps the early trainer. No torch here.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from pathlib import Path

from daemon.protocol import Event
from daemon.supervisor import launch
from daemon.supervisor import standby as early
from daemon.supervisor.standby import Standby


class TrainerProcess:
    """A running trainer: its ranks, the write end of their lifeline, and a thread pumping rank 0's events.

    The lifeline stays open while the handle lives: the trainer exits when it closes, so a trainer never
    outlives the daemon. close() once it is done.
    """

    def __init__(self, ranks: launch.Ranks, lifeline: int, early_pid: int | None = None):
        self.ranks = ranks
        self.early_pid = early_pid  # the early trainer's pid if it took the job, else None
        # An early trainer waits at its GPU gate until go(): it prepares on the CPU, holds no device lock
        # (standby.py). A fresh trainer was started holding its locks: it is past the gate from its start.
        self.gated = early_pid is not None
        self._lifeline = lifeline
        self._events: queue.Queue = queue.Queue()
        self._pump = threading.Thread(target=_pump_events, args=(ranks.stdout, self._events), daemon=True)
        self._pump.start()
        self._stop_asked_at: float | None = None
        self._stop_signalled = False
        self._killed = False
        # For the stall watchdog: when the trainer last said anything, what, and its slowest pace so far.
        self.last_event: dict | None = None
        self._last_event_at = time.monotonic()
        self._last_progress_at: float | None = None
        self._slowest_progress_gap = 0.0

    @classmethod
    def start(cls, job_dir: Path, micro_batch: int | None, grant: launch.Grant, *, root: Path, state_dir: Path,
              standby: Standby | None = None, slot: str = "cpu0", early_only: bool = False) -> "TrainerProcess":
        """The job's trainer: `standby` if it is alive and was started for this grant (else it is discarded;
        it then waits at its GPU gate until go()), or fresh ranks, once the trainer locks of its devices (or CPU
        `slot`) are ours. `early_only`: another trainer holds those locks now, so no fresh one may be started:
        OSError if the standby cannot take the job."""
        if standby is not None:
            if standby.usable_for(grant):
                try:
                    ranks, lifeline = standby.take(job_dir, micro_batch)
                    return cls(ranks, lifeline, early_pid=standby.pid)
                except OSError:
                    pass  # it died a moment ago
            standby.discard()
        if early_only:
            raise OSError("the early trainer ended before it could take the job")
        lock_fds = launch.acquire_trainer_lock(state_dir, launch.lock_names(grant, slot))
        try:
            life_r, lifeline = os.pipe()
        except BaseException:
            for fd in lock_fds:
                os.close(fd)
            raise
        cmd = launch.trainer_command(job_dir, root, life_r, os.getpid(), micro_batch)
        try:
            ranks = launch.start(cmd, grant, launch.trainer_env(), job_dir, pass_fds=(life_r, *lock_fds), cwd=root)
        except BaseException:
            os.close(lifeline)
            raise
        finally:
            os.close(life_r)
            for fd in lock_fds:  # the ranks hold the trainer locks until the last exits, even if we die first
                os.close(fd)
        return cls(ranks, lifeline)

    def go(self, locks: list[str]) -> None:
        """Open the GPU gate of an early trainer (the daemon checked that no other trainer is past its own and
        that `locks` are free): it takes those trainer locks, loads and trains. OSError if it is gone."""
        self.gated = False
        self._last_event_at = time.monotonic()  # loading is watched from the go on, not from the wait
        early.go(self.ranks, locks)

    @property
    def waiting_for_gpu(self) -> bool:
        """Prepared, at its GPU gate: it said so (phase waiting_for_gpu) and has not had the go."""
        return self.gated and (self.last_event or {}).get("phase") == "waiting_for_gpu"

    # ------------------------------------------------------------- events
    def poll_events(self, timeout: float) -> list[dict]:
        """The events rank 0 wrote since the last call; waits up to `timeout` seconds for the first."""
        try:
            events = [self._events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        self._last_event_at, self.last_event = now, events[-1]
        if self._stop_asked_at is not None and not self._stop_signalled:
            self._signal_stop()  # the stop asked before the trainer was ready for it (warm_stop)
        if any(ev.get("event") == Event.PROGRESS for ev in events):
            if self._last_progress_at is not None:
                self._slowest_progress_gap = max(self._slowest_progress_gap, now - self._last_progress_at)
            self._last_progress_at = now
        return events

    def stalled(self, timeout: float, start_timeout: float) -> float | None:
        """Seconds the trainer has been silent, once that is past its allowance: `start_timeout` before its
        first event (imports), then `timeout`, or three times its slowest pace between progress lines if that
        is longer (a slow job is not a stalled one). None while it is within it, or once a stop was asked (the
        stop has its own timeout)."""
        if self._killed or self._stop_asked_at is not None or self.waiting_for_gpu:
            return None  # silent by design: the job before it may train for hours
        allowance = start_timeout if self.last_event is None else max(timeout, 3 * self._slowest_progress_gap)
        silent = time.monotonic() - self._last_event_at
        return silent if silent > allowance else None

    @property
    def done(self) -> bool:
        """Every rank has exited and every event it wrote has been taken."""
        return self.ranks.poll() is not None and not self._pump.is_alive() and self._events.empty()

    def exit_status(self) -> int:
        """The job's exit status (launch.job_exit_code); waits for the ranks if they still run."""
        return self.ranks.wait()

    def stop_if_a_rank_failed(self) -> tuple[int, int] | None:
        """Kill the group when one rank has failed while others still run (they would wait in a collective for
        a peer that is gone); (rank, status) of the failed rank, the first time only."""
        failed = self.ranks.failed_rank()
        if failed:
            self.cold_stop()
        return failed

    # -------------------------------------------------------------- stops
    def warm_stop(self) -> bool:
        """Ask every rank to checkpoint and exit (SIGUSR1); True the first time, False once asked.

        Before the trainer's first event the signal is held back and sent with that event (poll_events): the
        trainer sets its handler before it says anything, and until then SIGUSR1 would kill it (a pause a
        moment after the job started must still be a warm stop). The stop timeout runs from the ask."""
        if self._stop_asked_at is not None:
            return False
        self._stop_asked_at = time.monotonic()
        if self.last_event is not None:
            self._signal_stop()
        return True

    def _signal_stop(self) -> None:
        self._stop_signalled = True
        self.ranks.send_signal(signal.SIGUSR1)

    def stop_overdue(self, timeout: float) -> bool:
        """A warm stop was asked more than `timeout` seconds ago and the trainer has not been killed yet."""
        return (not self._killed and self._stop_asked_at is not None
                and time.monotonic() - self._stop_asked_at > timeout)

    def cold_stop(self) -> None:
        """SIGKILL to every rank and whatever they started."""
        self._killed = True
        self.ranks.kill()

    def close(self) -> None:
        os.close(self._lifeline)

    def describe(self) -> str:
        return f"pid {self.ranks.pid}"


def _pump_events(stream, events: queue.Queue) -> None:
    for raw in stream:
        try:
            ev = json.loads(raw)
            if isinstance(ev, dict):
                events.put(ev)
        except ValueError:
            events.put({"event": Event.LOG.value, "message": raw.decode(errors="replace").rstrip()})
