"""SlurmTrainer: the daemon's handle on one attempt running as a Slurm batch job (the same shape as
trainer_process.TrainerProcess: daemon/supervisor/executor.py's TrainerHandle). slurm.py submits the job and
re-attaches to it; this module watches it: its events (events.jsonl), its state (scontrol), its stops (scancel)
and its exit status (slurm_exit.py). No torch here.

Slurm may stop answering at any moment (a busy or restarting controller): nothing here then waits more than one
command's timeout, a stop or a kill Slurm did not take is asked again at a later poll, and at the daemon's own
stop the attempt can be left to Slurm (leave_running) instead of holding the daemon forever.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemon import faults
from daemon.protocol import ErrorKind, Event
from daemon.supervisor import slurm_commands, slurm_exit
from daemon.supervisor.outcome import write_error
from daemon.supervisor.slurm_commands import GONE, SlurmUnavailable, run

EVENTS_FILE = "events.jsonl"
# States after which the job will not run again (a requeue passes through REQUEUED/PENDING instead).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED")
# States in which the job waits in Slurm's queue: not a stall; a warm stop cancels it (nothing ran yet).
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")
# Hooked events (hooks.py hears them): the offset past them is saved before they are reported, so a re-attached
# handle never reports them twice.
_ONCE = (Event.PUBLISHED.value,)


class SlurmTrainer:
    """One attempt as a Slurm job. `record` is its entry in job.attempts and `save` writes job.json: what a
    restarted daemon needs (the job id found late, the events already reported, a stop already sent) is kept
    there. close() leaves the Slurm job alone: it outlives the daemon by design."""

    early_pid = None

    def __init__(self, job_dir: Path, cfg, slurm_id: str | None, name: str, tasks: int, record: dict | None = None,
                 save=None):
        self.job_dir, self.cfg, self.slurm_id, self.name, self.tasks = job_dir, cfg, slurm_id, name, tasks
        self.record = record if record is not None else {}
        self._save = save or (lambda: None)
        self.slurm_state = "PENDING"
        self.reason: str | None = None
        self.restarts: int | None = None  # Slurm's count of requeues; None until first asked (a re-attached job's
        #                                  earlier requeues are not news)
        self._checked_at = -1e9
        self._offset = int(self.record.get("events_offset") or 0)  # in events.jsonl: what was reported already
        self._drained = False
        self._reported_once = False
        self._pending: list[dict] = []  # the handle's own events (Slurm's queue, a requeue), given with the next poll
        self._announced_state: str | None = None
        self._queue_reason_said: str | None = None
        self._unanswered_since: float | None = None  # Slurm has not answered since then
        self._lookup = False  # the id is not known yet: found by the job's name (a re-attach Slurm did not answer)
        self._refused: str | None = None
        asked = self.record.get("slurm_stop_signalled")  # a warm stop sent before a daemon restart
        self._stop_asked_at: float | None = time.monotonic() if asked else None
        self._stop_signalled = bool(asked)
        self._cancelled_queued = False
        self._kill_asked = False
        self._killed = False  # Slurm took the kill (scancel answered)
        self.last_event: dict | None = None
        self._last_event_at = time.monotonic()
        self._running_since: float | None = None
        self._last_progress_at: float | None = None
        self._slowest_progress_gap = 0.0

    @classmethod
    def refused(cls, job_dir: Path, cfg, name: str, reason: str, notes: list[str] = ()) -> "SlurmTrainer":
        """A submission that did not happen: done at once, UNAVAILABLE, error.json saying why."""
        write_error(job_dir, ErrorKind.UNAVAILABLE, reason)
        handle = cls(job_dir, cfg, None, name, 0)
        handle._refused = reason
        handle.slurm_state = "NOT SUBMITTED"
        handle._drained = True
        for note in notes:
            handle._note(note)
        return handle

    @classmethod
    def looking_up(cls, job_dir: Path, cfg, name: str, tasks: int, record: dict, save) -> "SlurmTrainer":
        """A re-attach Slurm could not answer: the job is found by its name at a later poll. Until then it is
        a trainer that has not spoken: the start timeout bounds the wait, as for any silent trainer."""
        handle = cls(job_dir, cfg, None, name, tasks, record, save)
        handle._lookup = True
        handle.slurm_state = "UNKNOWN"
        handle._running_since = time.monotonic()
        handle._unanswered_since = time.monotonic()
        return handle

    def describe(self) -> str:
        if self.slurm_id is None:
            return f"Slurm job named {self.name} (looking it up)" if self._lookup else "Slurm (not submitted)"
        return f"Slurm job {self.slurm_id} ({self.slurm_state.lower()})"

    def who(self) -> str:
        return f"Slurm job {self.slurm_id}" if self.slurm_id else f"the Slurm job named {self.name}"

    # ------------------------------------------------------------- Slurm's view
    def _refresh(self, force: bool = False) -> None:
        """Slurm's state of the job, at most every poll_seconds (and not while another command just timed out):
        scontrol while it knows the job, then sacct. A stop or kill Slurm did not take yet is asked again here."""
        if self._refused is not None or self.slurm_state in ENDED + (GONE,):
            return
        now = time.monotonic()
        if slurm_commands.unresponsive() or (not force and now - self._checked_at < self.cfg.slurm.poll_seconds):
            return
        self._checked_at = now
        if self.slurm_id is None:
            if not self._find_by_name():
                return
        try:
            info = slurm_commands.job_info(self.slurm_id, self.cfg.slurm.command_timeout_seconds)
        except SlurmUnavailable as e:
            self._no_answer(f"cannot ask Slurm about job {self.slurm_id}: {e}")
            return
        self._unanswered_since = None
        self._update(info, now)
        self._push_stops()

    def _no_answer(self, message: str) -> None:
        if self._unanswered_since is None:  # said once per spell; the job's state stays as last seen
            self._note(message)
            self._unanswered_since = time.monotonic()

    def _find_by_name(self) -> bool:
        """The id of a job re-attached by name once Slurm answers; False while it does not (or has no such job,
        which ends the attempt: its ranks' statuses, if any, say how)."""
        found = slurm_commands.jobs_named([self.name], self.cfg.slurm.command_timeout_seconds)
        if found is None:
            self._no_answer(f"cannot ask Slurm for the job named {self.name}: it does not answer; asking again")
            return False
        self._unanswered_since = None
        written = [s.get("slurm_job_id") for s in slurm_commands.rank_statuses(self.job_dir).values()]
        slurm_id = found[-1][0] if found else next((s for s in written if s), None)
        if slurm_id is None:
            self._lookup, self.slurm_state = False, GONE
            return False
        self._lookup, self.slurm_id = False, str(slurm_id)
        self.record["slurm_job_id"] = self.slurm_id
        self._save()
        self._note(f"found Slurm job {self.slurm_id} by its name {self.name}", level="info")
        return True

    def _update(self, info: dict | None, now: float) -> None:
        state = info.get("JobState", GONE).split()[0] if info else GONE
        self.reason = info.get("Reason") if info and info.get("Reason") not in (None, "None") else None
        restarts = int(info.get("Restarts", 0) or 0) if info else (self.restarts or 0)
        if self.restarts is None:
            self.restarts = restarts
        elif restarts > self.restarts:
            self.restarts = restarts
            self.last_event, self._running_since = None, None  # a new run: imports again, a stop waits again
            if self._stop_asked_at is not None and not self._cancelled_queued:
                self._stop_signalled = False  # the new run never heard the stop: it is sent again once it runs
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
            self._note(f"Slurm job {self.slurm_id} waits in Slurm's queue ({self.reason})", level="info")
        self.slurm_state = state

    # ------------------------------------------------------------- events
    def poll_events(self, timeout: float) -> list[dict]:
        """Rank 0's new complete lines of events.jsonl, and the handle's own; waits up to `timeout` for one."""
        self._after_report()
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
        if any(ev.get("event") in _ONCE for ev in events):
            self.record["events_offset"] = self._offset  # before the caller reports them: never twice
            self._save()
            self._reported_once = True
        now = time.monotonic()
        trainer_said = [ev for ev in events if not ev.get("from_slurm")]
        # Only a running job's trainer speaks now: lines read while Slurm queues it are an earlier run's (a
        # requeue) and must not make a stop wait for a trainer that is not there, nor reset its clocks.
        if trainer_said and self.slurm_state == "RUNNING":
            self._last_event_at, self.last_event = now, trainer_said[-1]
            self._push_warm()  # the stop asked before the trainer was ready for it (warm_stop)
        if self.slurm_state == "RUNNING" and any(ev.get("event") == Event.PROGRESS for ev in trainer_said):
            if self._last_progress_at is not None:
                self._slowest_progress_gap = max(self._slowest_progress_gap, now - self._last_progress_at)
            self._last_progress_at = now
        return events

    def _after_report(self) -> None:
        """The caller has reported the batch with a published/held event: the fault point for a daemon killed
        right after (the restarted one must not report it again)."""
        if self._reported_once:
            self._reported_once = False
            faults.check("slurm_published_reported")

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
        self._after_report()
        self._refresh()
        if self.slurm_state not in ENDED + (GONE,) and self._refused is None:
            return False
        if not self._drained:
            self._pending += self._read_new()
            if self._pending:
                return False
        return self._drained and not self._pending

    def exit_status(self) -> int:
        return slurm_exit.exit_status(self)

    def _note(self, message: str, level: str = "warning") -> None:
        """A line for status.log, given with the next poll_events (not the trainer's: no stall clock reset)."""
        self._pending.append({"event": Event.LOG.value, "level": level, "message": message, "from_slurm": True})

    def stop_if_a_rank_failed(self) -> tuple[int, int] | None:
        """Nothing to do: srun --kill-on-bad-exit ends the other ranks when one fails."""
        return None

    def stalled(self, timeout: float, start_timeout: float) -> float | None:
        """As TrainerProcess.stalled, counted only while Slurm runs the job (or while a re-attach looks for it):
        waiting in Slurm's queue (or a requeue) is not a stall. The start allowance runs from when it started."""
        if self._kill_asked or self._stop_asked_at is not None or self._running_since is None:
            return None
        allowance = start_timeout if self.last_event is None else max(timeout, 3 * self._slowest_progress_gap)
        silent = time.monotonic() - max(self._last_event_at, self._running_since)
        return silent if silent > allowance else None

    # ------------------------------------------------------------- stops
    def warm_stop(self) -> bool:
        """Checkpoint and exit 75: SIGUSR1 to every rank (scancel --signal=USR1) of a job Slurm runs and whose
        trainer has spoken (its handler is set before its first event); a job Slurm still queues is cancelled
        instead (nothing ran). Slurm's state is asked first: USR1 to a queued job hangs scancel. What Slurm did
        not take now is asked again at a later poll. True the first time."""
        if self._stop_asked_at is not None:
            return False
        self._stop_asked_at = time.monotonic()
        self._refresh(force=True)
        self._push_warm()
        return True

    def _push_stops(self) -> None:
        """At each look at Slurm: a kill or a warm stop Slurm did not take yet is asked again."""
        if self._kill_asked and not self._killed:
            self._kill()
        else:
            self._push_warm()

    def _push_warm(self) -> None:
        if self._stop_asked_at is None or self._stop_signalled or self.slurm_id is None:
            return
        if slurm_commands.unresponsive():
            return  # asked again at a later look
        if self.slurm_state in QUEUED:
            if self._scancel():
                self._stop_signalled = self._cancelled_queued = True
        elif self.slurm_state == "RUNNING" and self.last_event is not None:
            if self._scancel("--signal=USR1"):
                self._stop_signalled = True
                self.record["slurm_stop_signalled"] = True  # a re-attached handle knows the stop was asked
                self._save()

    def stop_overdue(self, timeout: float) -> bool:
        return (not self._kill_asked and self._stop_asked_at is not None
                and time.monotonic() - self._stop_asked_at > timeout)

    def cold_stop(self) -> None:
        """SIGKILL to the ranks, then the job cancelled (scancel alone would give them KillWait seconds). Only
        once Slurm took both is the job taken as killed; until then each poll asks again."""
        first, self._kill_asked = not self._kill_asked, True
        if first and not slurm_commands.unresponsive():
            self._kill()  # if Slurm does not take it, each later look asks again (_push_stops)

    def _kill(self) -> None:
        if self.slurm_id is None:
            if self._lookup and self._scancel(f"--name={self.name}", target=None):
                self._killed, self._lookup, self.slurm_state = True, False, GONE  # nothing left to watch
            return
        if self._scancel("--signal=KILL") and self._scancel():
            self._killed = True

    def leave_running(self, signals: int, stop_timeout: float) -> bool:
        """At the daemon's stop: let this attempt go without ending it (it stays in running/ with no outcome and
        the next start re-attaches) on a cold stop (a second signal), or once Slurm has not answered for
        `stop_timeout` during the stop. The daemon must not wait forever on a controller that does not answer."""
        if self._refused is not None or self.slurm_state in ENDED + (GONE,) or not signals:
            return False
        if signals >= 2:
            return True
        since = self._unanswered_since
        return (since is not None and self._stop_asked_at is not None
                and time.monotonic() - max(since, self._stop_asked_at) > stop_timeout)

    def _scancel(self, *options: str, target: str | None = "id") -> bool:
        """True when Slurm took it (or the job had ended meanwhile, which the next look shows)."""
        args = ["scancel", *options] + ([self.slurm_id] if target else [])
        self._checked_at = -1e9  # ask Slurm again at the next look
        try:
            r = run(args, self.cfg.slurm.command_timeout_seconds)
        except SlurmUnavailable as e:
            self._no_answer(f"{' '.join(args)}: {e}; asking again")
            return False
        if r.returncode != 0 and "already" not in r.stderr:
            self._note(f"{' '.join(args)}: {slurm_commands.last_line(r.stderr) or f'status {r.returncode}'}")
            return "Invalid job id" in r.stderr  # Slurm forgot the job: nothing left to stop
        return True

    def close(self) -> None:
        """The daemon is done with the handle; the Slurm job (ended, or running on past a daemon stop) is left be."""
