"""`executor: slurm`: each attempt of a job is one Slurm batch job, and SlurmTrainer is the daemon's handle on it
(the same shape as trainer_process.TrainerProcess: daemon/supervisor/executor.py's TrainerHandle).

The Slurm job outlives the daemon by design: there is no lifeline, rank 0's events go to <job_dir>/events.jsonl,
each rank leaves its exit status in <job_dir>/slurm-rank<r>.exit, and a restarted daemon re-attaches (reattach)
by the job id, or by the job name recorded before sbatch ran. Slurm's commands (sbatch, scontrol, scancel) are run
directly, each with a timeout (slurm_commands.py); the batch script is slurm_script.py's. No torch here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemon import durable, protocol
from daemon.paths import Layout
from daemon.protocol import ErrorKind, Event
from daemon.supervisor import launch, slurm_commands, slurm_script
from daemon.supervisor.outcome import write_error
from daemon.supervisor.slurm_commands import GONE, SlurmUnavailable, problem, run  # noqa: F401 - problem: gate.py

EVENTS_FILE = "events.jsonl"
# States after which the job will not run again (a requeue passes through REQUEUED/PENDING instead).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED")
# States in which the job waits in Slurm's queue: not a stall; a warm stop cancels it (nothing ran yet).
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")


# ---------------------------------------------------------------------------- submit and re-attach

def start(job, job_dir: Path, micro_batch: int | None, cfg, layout: Layout, record: dict) -> "SlurmTrainer":
    """Submit this attempt of `job` (record: its entry in job.attempts). The job name is saved in job.json before
    sbatch runs, so a daemon that dies in between finds the job by name. A refused or impossible submission
    is an attempt that ended UNAVAILABLE, with sbatch's own words in error.json: the queue waits, nothing is lost."""
    name = slurm_script.job_name(layout.root, job.id, record["n"])
    tasks = slurm_script.world_size(cfg)
    record.update(executor="slurm", slurm_job_name=name, slurm_tasks=tasks)
    record.pop("slurm_job_id", None)
    job.save(job_dir)
    # This attempt's files only: the previous attempt's statuses and events must not speak for it.
    for old in job_dir.glob("slurm-rank*.exit"):
        old.unlink(missing_ok=True)
    (job_dir / EVENTS_FILE).unlink(missing_ok=True)
    script = job_dir / slurm_script.BATCH_SCRIPT
    durable.write_text(script, slurm_script.batch_script(cfg, job_dir, layout.root, name, micro_batch))
    try:
        r = run(["sbatch", "--parsable", str(script)], cfg.slurm.command_timeout_seconds)
    except SlurmUnavailable as e:
        return SlurmTrainer.refused(job_dir, cfg, name, f"sbatch could not be run: {e}")
    if r.returncode != 0:
        return SlurmTrainer.refused(job_dir, cfg, name, f"sbatch refused: {r.stderr.strip() or r.stdout.strip()}")
    slurm_id = r.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    record["slurm_job_id"] = slurm_id
    job.save(job_dir)
    return SlurmTrainer(job_dir, cfg, slurm_id, name, tasks)


def reattach(job, job_dir: Path, cfg, layout: Layout, record: dict) -> "SlurmTrainer | None":
    """The handle on an attempt a dead daemon left running: by its recorded id, else by its name (the daemon
    died between sbatch and saving the id), else by the id its ranks wrote. None when Slurm knows no such job
    and no rank left a status: then nothing runs and the start-up sweep requeues the job as for a local one.
    Its events are read again from the start of the attempt (the loop's handling of them is idempotent)."""
    name = record.get("slurm_job_name") or slurm_script.job_name(layout.root, job.id, record["n"])
    tasks = record.get("slurm_tasks") or slurm_script.world_size(cfg)
    slurm_id = record.get("slurm_job_id")
    if slurm_id is None:
        try:
            r = run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], cfg.slurm.command_timeout_seconds)
            found = r.stdout.split() if r.returncode == 0 else []
        except SlurmUnavailable:
            found = []
        if found:
            slurm_id = found[-1]
        else:
            written = slurm_commands.rank_statuses(job_dir).values()
            slurm_id = next((s["slurm_job_id"] for s in written if s.get("slurm_job_id")), None)
        if slurm_id is None:
            return None
        record["slurm_job_id"] = str(slurm_id)
        job.save(job_dir)
    handle = SlurmTrainer(job_dir, cfg, str(slurm_id), name, tasks)
    handle._refresh(force=True)
    if handle.slurm_state == GONE and not slurm_commands.rank_statuses(job_dir):
        return None
    return handle


# ---------------------------------------------------------------------------- the handle

class SlurmTrainer:
    """One attempt as a Slurm job: its events (read from events.jsonl), its state (asked of Slurm at most every
    slurm.poll_seconds), its stops (scancel) and its exit status (the ranks' exit files, or Slurm's end state
    when no rank could write one). close() leaves the Slurm job alone: it outlives the daemon by design."""

    early_pid = None

    def __init__(self, job_dir: Path, cfg, slurm_id: str | None, name: str, tasks: int):
        self.job_dir, self.cfg, self.slurm_id, self.name, self.tasks = job_dir, cfg, slurm_id, name, tasks
        self.slurm_state = "PENDING"
        self.reason: str | None = None
        self.restarts: int | None = None  # Slurm's count of requeues; None until first asked (a re-attached job's
        #                                  earlier requeues are not news)
        self._checked_at = -1e9
        self._offset = 0  # in events.jsonl: in memory only (a re-attached handle reads the attempt again)
        self._drained = False
        self._pending: list[dict] = []  # the handle's own events (Slurm's queue, a requeue), given with the next poll
        self._announced_state: str | None = None
        self._queue_reason_said: str | None = None
        self._query_failing = False
        self._refused: str | None = None
        self._stop_asked_at: float | None = None
        self._stop_signalled = False
        self._cancelled_queued = False
        self._killed = False
        self.last_event: dict | None = None
        self._last_event_at = time.monotonic()
        self._running_since: float | None = None
        self._last_progress_at: float | None = None
        self._slowest_progress_gap = 0.0

    @classmethod
    def refused(cls, job_dir: Path, cfg, name: str, reason: str) -> "SlurmTrainer":
        """A submission that did not happen: done at once, UNAVAILABLE, error.json saying why."""
        write_error(job_dir, ErrorKind.UNAVAILABLE, reason)
        handle = cls(job_dir, cfg, None, name, 0)
        handle._refused = reason
        handle.slurm_state = "NOT SUBMITTED"
        handle._drained = True
        return handle

    def describe(self) -> str:
        if self.slurm_id is None:
            return "Slurm (not submitted)"
        return f"Slurm job {self.slurm_id} ({self.slurm_state.lower()})"

    # ------------------------------------------------------------- Slurm's view
    def _refresh(self, force: bool = False) -> None:
        """Slurm's state of the job, at most every poll_seconds: scontrol while it knows the job, then sacct."""
        if self.slurm_id is None or self.slurm_state in ENDED + (GONE,):
            return
        now = time.monotonic()
        if not force and now - self._checked_at < self.cfg.slurm.poll_seconds:
            return
        self._checked_at = now
        try:
            info = slurm_commands.job_info(self.slurm_id, self.cfg.slurm.command_timeout_seconds)
        except SlurmUnavailable as e:
            if not self._query_failing:  # said once per spell; the job's state stays as last seen
                self._note(f"cannot ask Slurm about job {self.slurm_id}: {e}")
            self._query_failing = True
            return
        self._query_failing = False
        state = info.get("JobState", GONE).split()[0] if info else GONE
        self.reason = info.get("Reason") if info and info.get("Reason") not in (None, "None") else None
        restarts = int(info.get("Restarts", 0) or 0) if info else (self.restarts or 0)
        if self.restarts is None:
            self.restarts = restarts
        elif restarts > self.restarts:
            self.restarts = restarts
            self.last_event, self._running_since = None, None  # a new run: imports again, a stop waits again
            why = f", {self.reason}" if self.reason else ""
            self._note(f"Slurm requeued job {self.slurm_id} (restart {restarts}{why}): its trainer resumes from the "
                       "last checkpoint")
        if state == "RUNNING" and self._running_since is None:
            self._running_since = now
        elif state != "RUNNING":
            self._running_since = None
        if state in QUEUED and self._announced_state != "PENDING":
            self._pending.append({"event": Event.PHASE.value, "phase": "queued in Slurm", "from_slurm": True,
                                  "slurm_job_id": self.slurm_id, "reason": self.reason})
            self._announced_state = "PENDING"
        elif state == "RUNNING":
            self._announced_state, self._queue_reason_said = "RUNNING", None
        if state in QUEUED and self.reason and self.reason != self._queue_reason_said:
            # Said once Slurm names a reason (Priority, Resources, BeginTime...): a job it starts at once has none.
            self._queue_reason_said = self.reason
            self._pending.append({"event": Event.LOG.value, "from_slurm": True,
                                  "message": f"Slurm job {self.slurm_id} waits in Slurm's queue ({self.reason})"})
        self.slurm_state = state
        if self._stop_asked_at is not None and not self._stop_signalled and state in QUEUED:
            self._cancel_queued()

    # ------------------------------------------------------------- events
    def poll_events(self, timeout: float) -> list[dict]:
        """Rank 0's new complete lines of events.jsonl, and the handle's own; waits up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        while True:
            self._refresh()
            events = self._pending + self._read_new()
            self._pending = []
            if events or time.monotonic() >= deadline:
                break
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if not events:
            return []
        now = time.monotonic()
        trainer_said = [ev for ev in events if not ev.get("from_slurm")]
        if trainer_said:
            self._last_event_at, self.last_event = now, trainer_said[-1]
            if self._stop_asked_at is not None and not self._stop_signalled:
                self._signal_stop()  # the stop asked before the trainer was ready for it (warm_stop)
        if any(ev.get("event") == Event.PROGRESS for ev in trainer_said):
            if self._last_progress_at is not None:
                self._slowest_progress_gap = max(self._slowest_progress_gap, now - self._last_progress_at)
            self._last_progress_at = now
        return events

    def _read_new(self) -> list[dict]:
        ended = self.slurm_state in ENDED + (GONE,)
        try:
            with open(self.job_dir / EVENTS_FILE, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1  # complete lines only: rank 0 may be writing the next one
        if ended and end == 0:
            self._drained = True
        self._offset += end
        events = []
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": Event.LOG.value, "message": raw.decode(errors="replace")}
            if isinstance(ev, dict):
                events.append(ev)
        return events

    @property
    def done(self) -> bool:
        """Slurm says the job ended (not merely requeued) and every event was taken."""
        self._refresh()
        if self.slurm_state not in ENDED + (GONE,) and self._refused is None:
            return False
        if not self._drained:
            self._pending += self._read_new()
            if self._pending:
                return False
        return self._drained and not self._pending

    def exit_status(self) -> int:
        """The job's status as launch.job_exit_code makes it from the ranks' exit files. A rank without one was
        killed: collateral when the daemon cancelled the job. An end no rank could report (node failure, a
        time limit before a checkpoint, a cancel from outside) fails the attempt, error.json naming Slurm's state."""
        if self._refused is not None:
            return protocol.UNAVAILABLE
        if self._cancelled_queued:
            return protocol.STOPPED  # a warm stop while Slurm still queued it: nothing ran, nothing lost
        statuses = slurm_commands.rank_statuses(self.job_dir)
        codes = [statuses[r]["code"] if r in statuses else -9 for r in range(max(self.tasks, 1))]
        missing = {r for r in range(len(codes)) if r not in statuses}
        state = self.slurm_state + (f" ({self.reason})" if self.reason else "")
        if self._killed:
            return launch.job_exit_code(codes, missing)
        if not statuses:
            self._say(f"Slurm job {self.slurm_id} ended {state} before its trainer could report how "
                      f"(see {self.job_dir.name}/slurm-{self.slurm_id}.out and trainer.log)")
            return protocol.FAILED
        code = launch.job_exit_code(codes, set())
        if code == protocol.STOPPED and self._stop_asked_at is None and self.slurm_state == "CANCELLED":
            # Its ranks checkpointed on Slurm's SIGTERM: someone cancelled the job outside the daemon. A failed
            # attempt (counted, retried from that checkpoint), not a pause nobody asked for.
            self._say(f"Slurm job {self.slurm_id} was cancelled outside the daemon (state {state}); "
                      "its trainer checkpointed first")
            return protocol.FAILED
        if code not in (protocol.DONE, protocol.STOPPED) and missing and not (self.job_dir / "error.json").exists():
            self._say(f"Slurm job {self.slurm_id} ended {state}; rank {', '.join(map(str, sorted(missing)))} "
                      "left no status (killed)")
        return code

    def _note(self, message: str) -> None:
        """A warning for status.log, given with the next poll_events (not the trainer's: no stall clock reset)."""
        self._pending.append({"event": Event.LOG.value, "level": "warning", "message": message, "from_slurm": True})

    def _say(self, message: str) -> None:
        write_error(self.job_dir, ErrorKind.ERROR, message)

    def stop_if_a_rank_failed(self) -> tuple[int, int] | None:
        """Nothing to do: srun --kill-on-bad-exit ends the other ranks when one fails."""
        return None

    def stalled(self, timeout: float, start_timeout: float) -> float | None:
        """As TrainerProcess.stalled, counted only while Slurm runs the job: waiting in Slurm's queue (or a
        requeue) is not a stall. The start allowance runs from when the job started running."""
        if self._killed or self._stop_asked_at is not None or self._running_since is None:
            return None
        allowance = start_timeout if self.last_event is None else max(timeout, 3 * self._slowest_progress_gap)
        silent = time.monotonic() - max(self._last_event_at, self._running_since)
        return silent if silent > allowance else None

    # ------------------------------------------------------------- stops
    def warm_stop(self) -> bool:
        """SIGUSR1 to every rank (scancel --signal=USR1): checkpoint and exit 75. Held back until the trainer's
        first event (its handler is set before it); a job still queued in Slurm is cancelled instead (nothing
        ran). True the first time."""
        if self._stop_asked_at is not None:
            return False
        self._stop_asked_at = time.monotonic()
        if self.last_event is not None:
            self._signal_stop()
        else:
            self._refresh(force=True)
        return True

    def _signal_stop(self) -> None:
        self._stop_signalled = True
        self._scancel("--signal=USR1")

    def _cancel_queued(self) -> None:
        self._stop_signalled = self._cancelled_queued = True
        self._scancel()

    def stop_overdue(self, timeout: float) -> bool:
        return (not self._killed and self._stop_asked_at is not None
                and time.monotonic() - self._stop_asked_at > timeout)

    def cold_stop(self) -> None:
        """SIGKILL to the ranks, then the job cancelled (scancel alone would give them KillWait seconds)."""
        if self.slurm_id is None or self._killed:
            return
        self._killed = True
        self._scancel("--signal=KILL")
        self._scancel()

    def _scancel(self, *options: str) -> None:
        if self.slurm_id is None:
            return
        try:
            r = run(["scancel", *options, self.slurm_id], self.cfg.slurm.command_timeout_seconds)
            # "already completing or completed": the job ended meanwhile, which the next look shows anyway.
            if r.returncode != 0 and r.stderr.strip() and "already" not in r.stderr:
                self._note(f"scancel {' '.join(options)} {self.slurm_id}: {slurm_commands.last_line(r.stderr)}")
        except SlurmUnavailable as e:
            self._note(str(e))
        self._checked_at = -1e9  # ask Slurm again at the next look

    def close(self) -> None:
        """The daemon is done with the handle; the Slurm job (ended, or running on past a daemon stop) is left be."""


