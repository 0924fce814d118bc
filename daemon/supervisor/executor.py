"""What the daemon's loop holds for each running job: a trainer handle, whoever runs the trainer.

Two executors: local (trainer_process.TrainerProcess: the ranks are the daemon's children, tied to it by the
lifeline) and Slurm (daemon/supervisor/slurm.py: one batch job per attempt, which outlives a daemon restart by
design and is re-attached after it). The loop polls a handle and never waits on it, so one loop can watch
several jobs at once; nothing in a handle calls back into the daemon.

What an executor must do:
- poll_events returns rank 0's new events (protocol.Event dicts), waiting at most `timeout` for the first;
- `done` turns true only once every rank has ended AND every event was taken (the last events say how it ended);
- exit_status gives one protocol exit code for the job (launch.job_exit_code semantics: the cause, not the
  consequence; 75 = protocol.STOPPED after a warm stop);
- warm_stop asks every rank to checkpoint and exit 75, once (True the first time); stop_overdue says the
  ask is older than `timeout`; cold_stop kills now;
- stop_if_a_rank_failed ends the rest of the group once one rank failed, and says which, once;
- stalled returns how long the trainer has been silent once that is beyond its allowance (None otherwise);
- close lets go of whatever the handle holds (the local lifeline: the trainer exits when it closes);
- describe names the trainer for status lines: "pid 123", "Slurm job 45".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class TrainerHandle(Protocol):
    early_pid: int | None  # the early trainer's pid, if it took the job (local only)
    last_event: dict | None

    def poll_events(self, timeout: float) -> list[dict]: ...

    @property
    def done(self) -> bool: ...

    def exit_status(self) -> int: ...

    def stop_if_a_rank_failed(self) -> tuple[int, int] | None: ...

    def warm_stop(self) -> bool: ...

    def stop_overdue(self, timeout: float) -> bool: ...

    def cold_stop(self) -> None: ...

    def stalled(self, timeout: float, start_timeout: float) -> float | None: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...
