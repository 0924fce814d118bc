"""The daemon: watch the inbox, run one trainer at a time, record every outcome.

It never imports torch. One loop does everything, a turn at a time: new files, control requests, and while a
job trains, its trainer's events and stop requests (trainer_process.py holds the trainer; the loop polls it).
What each outcome means for the job is policy.py's to say. After a trainer exits, NVML must show its GPU
memory back. Signals: the first SIGTERM/SIGINT is a warm stop, the second a cold one (rq's worker does the same).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import __version__, durable, faults, protocol
from daemon.config import DaemonConfig, adapter_config, effective_dict
from daemon.paths import Layout, UserError
from daemon.protocol import ErrorKind, Event
from daemon.supervisor import control, decision_log, gate, gpu, hooks, launch, policy, trainer_events, web_start
from daemon.supervisor.intake import Intake
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind, describe_exit, resume_point, write_error
from daemon.supervisor.policy import Verdict
from daemon.supervisor.spool import Spool
from daemon.supervisor.standby import Standby, early_grant, start_early
from daemon.supervisor.status import LEVEL_ENV, StatusWriter
from daemon.supervisor.status_line import status_line
from daemon.supervisor.trainer_process import TrainerProcess
from daemon.timefmt import fmt_duration, now_iso
from daemon.textsafe import for_terminal


@dataclass
class Attempt:
    """The job in training, from its start to its trainer's exit."""

    job: Job
    job_dir: Path
    cfg: DaemonConfig  # with the adapter's overrides
    record: dict  # its entry in job.attempts
    gpu_before: dict | None
    trainer: TrainerProcess | None = None
    stalled: str | None = None  # why the daemon killed its trainer for silence, if it did


class Supervisor:
    def __init__(self, layout: Layout, cfg, config_path: Path | None = None, *, once: bool = False, echo: bool = True):
        self.layout, self.cfg, self.config_path, self.once = layout, cfg, config_path, once
        self.status = StatusWriter(layout, echo=echo, level=os.environ.get(LEVEL_ENV) or cfg.status.log_level)
        self.spool = Spool(layout)
        self.intake = Intake(layout, cfg.intake, self.spool, self.status)
        self.signals = 0
        self.state = "starting"
        self.current: dict | None = None  # the job in training, as status.json shows it
        self.attempt: Attempt | None = None
        self.results: list[bool] = []
        self.web = None
        self.standby: Standby | None = None  # the next job's trainer, started early
        self.notifier = None
        self.gate = gate.Gate(layout, self.status)  # whether the next job may start, and why not
        self._last_snapshot = 0.0
        self.started_at = now_iso()

    # ---------------------------------------------------------------- life
    def run(self) -> int:
        from daemon.supervisor.notify import Notifier

        self.notifier = Notifier()
        durable.forbid_world_writable()
        self.layout.ensure()
        self.layout.check_same_filesystem()
        self.lock = control.DaemonLock(self.layout).acquire()
        self._install_signals()
        self.status.event("daemon_started",
                          f"training-daemon {__version__} started on {self.layout.root} (pid {os.getpid()})",
                          pid=os.getpid(), root=str(self.layout.root))
        self.hooks = hooks.start_hooks(self.cfg, self.layout, self.status)  # read once: editing hooks needs a restart
        self._set_aside_unreadable(self.spool.list())
        for line in self.spool.sweep(self.cfg.limits.max_attempts):
            self.status.event("sweep", line, level="warning")
        self._clean_publish_leftovers()
        self.web = web_start.start(self.cfg, self.layout, self.status)
        self.intake.start()
        self._prestart()
        self.state = "paused" if control.is_paused(self.layout) else "idle"
        self.notifier.ready()  # first: a STATUS= before READY=1 would be the first thing systemd hears
        self.snapshot(force=True)
        try:
            self._loop()
        finally:
            if self.attempt is not None and self.attempt.trainer:
                # The loop itself failed with a trainer running: closing its lifeline makes it exit at once (the
                # start-up sweep will requeue its job), instead of training on while the daemon winds down.
                self.attempt.trainer.close()
            self.state = "stopping"
            self.notifier.stopping()
            self.intake.stop()
            if self.web:
                self.web.stop()
            if self.standby is not None:
                self.standby.discard()
            self.snapshot(force=True)
            self.hooks.close(wait_while=lambda: self.once and not self.signals)  # else 5 s, then abandoned
            self.status.event("daemon_stopped", "training-daemon stopped")
            self.lock.release()
        if self.once:
            # A --once run stopped by a signal before the queue was drained did not do what it was asked.
            left = self.spool.count(JobStatus.PENDING) if self.signals else 0
            return 0 if all(self.results) and not self.intake.claim_failures and not left else 1
        return 0

    def _loop(self) -> None:
        """The one loop: each turn does the housekeeping, then watches the job in training or starts the next.
        A stop (signal) ends it once no trainer runs."""
        while True:
            if self.attempt is not None:
                self._tick(timeout=0)  # the trainer's events are what this turn waits for
                self._watch_attempt()
                continue
            if self.signals:
                return
            self._tick(timeout=0.5)
            if self.signals:
                return
            if control.is_paused(self.layout):
                self.state = "paused"
                if self.once:  # nobody will resume a --once run: end it, the jobs stay pending
                    self._end_paused_once()
                    return
                continue
            pending = self._set_aside_unreadable(self.spool.list(JobStatus.PENDING))
            if pending:
                job, job_dir = pending[0]
                wait = self.gate.wait_state(self._config_for(job), self.cfg.limits.min_free_disk_mb,
                                            lock_needed=self.standby is None)
                if wait is not None:
                    self.state = wait
                    if self.once and wait != "waiting_for_trainer":  # nothing will fix it for us: they stay pending
                        self.results.append(False)
                        return
                    continue
                self._start_attempt(job, job_dir)
            elif self.once and not self._inbox_has_files():
                return
            else:  # a block is still shown (and re-checked) with nothing to run: the next file would meet it
                self.state = "blocked" if self.gate.still_blocked(self.cfg) else "idle"

    def _tick(self, timeout: float) -> None:
        """One turn of housekeeping: new files, control requests, watchdog, the status snapshot."""
        for job in self.intake.poll(timeout):
            if job.state == JobStatus.DONE:  # a duplicate, finished without training
                self.results.append(True)
            elif job.state == JobStatus.FAILED:  # rejected at intake (a symlink)
                self.results.append(False)
        for req in control.take(self.layout):
            self._apply(req)
        if self.notifier:
            self.notifier.watchdog()
        self.snapshot()

    # ------------------------------------------------------------------ jobs
    def _start_attempt(self, job: Job, job_dir: Path) -> None:
        # The attempt is written down in running/ before anything can fail: if the daemon dies from here on,
        # sweep() counts it, so no job can crash the daemon more than max_attempts times.
        job_dir = self.spool.move(job, JobStatus.RUNNING)
        record = {"n": len(job.attempts) + 1, "started_at": now_iso(), "micro_batch_size": job.micro_batch_size}
        job.started_at = job.started_at or record["started_at"]
        job.attempts.append(record)
        job.save(job_dir)
        try:  # an adapter override may have been added or broken since the daemon started
            cfg = adapter_config(self.cfg, job.adapter, self.config_path)
        except UserError as e:
            write_error(job_dir, ErrorKind.BAD_CONFIG, str(e))
            record.update(ended_at=now_iso(), outcome=OutcomeKind.BAD_CONFIG, error=str(e))
            self._finish(job, job_dir, self.cfg, Outcome(OutcomeKind.BAD_CONFIG, str(e)))
            return
        record["micro_batch_size"] = job.micro_batch_size or cfg.training.micro_batch_size
        snapshot_path = job_dir / "config.json"
        if not snapshot_path.exists():
            durable.write_json(snapshot_path, effective_dict(cfg))
        job.save(job_dir)
        self.current = {"job_id": job.id, "adapter": job.adapter, "file": job.original_name, "phase": "starting",
                        "started_at": record["started_at"], "step": 0, "total_steps": None, "arrived_unix": None}
        self.state = "training"
        self.status.event("job_started", f"job {job.id} started: {job.original_name} -> adapter {job.adapter} "
                          f"(attempt {record['n']})", job_id=job.id, adapter=job.adapter, attempt=record["n"])
        self.attempt = Attempt(job, job_dir, cfg, record, gpu_before=gpu.snapshot())
        faults.check("job_start", job_id=job.id)
        try:
            grant = launch.grant(self.cfg.gpus, self.cfg.cpu_processes, gpu.visible_devices())
        except UserError as e:  # the GPUs asked for are gone: no job can run until they are back
            write_error(job_dir, ErrorKind.UNAVAILABLE, str(e))
            self._end_attempt(protocol.UNAVAILABLE)
            return
        # This attempt's first failing rank writes it; one left by an earlier attempt would speak for this one.
        (job_dir / "error.json").unlink(missing_ok=True)
        if grant.processes > 1 or grant.devices is not None:
            self.status.event("launch", f"job {job.id}: training on {grant.describe()}",
                              level="info" if grant.processes > 1 else "debug", job_id=job.id,
                              processes=grant.processes, devices=grant.devices)
        standby, self.standby = self.standby, None
        try:
            trainer = TrainerProcess.start(job_dir, job.micro_batch_size, grant, root=self.layout.root,
                                           state_dir=self.layout.state, standby=standby)
        except OSError as e:  # its interpreter or the project gone: this attempt fails with why, the daemon goes on
            write_error(job_dir, ErrorKind.ERROR, f"the trainer could not be started: {e}")
            self._end_attempt(protocol.FAILED)
            return
        self.attempt.trainer = trainer
        if trainer.early_pid is not None:
            self.status.event("launch", f"job {job.id}: trainer started early (pid {trainer.early_pid})",
                              level="debug", job_id=job.id, pid=trainer.early_pid)

    def _watch_attempt(self) -> None:
        """One turn of the job in training: its trainer's new events, then failed ranks and stops, then its end."""
        job, trainer = self.attempt.job, self.attempt.trainer
        for event in trainer.poll_events(timeout=0.2):
            if event.get("event") == Event.PHASE and event.get("phase") == "saving" and self.notifier:
                # Saving may take as long as a warm stop may: systemd's watchdog must wait that long too.
                self.notifier.extend_timeout(int(self.cfg.limits.stop_timeout_seconds * 1e6))
            try:
                trainer_events.report(event, job, self.current, self.status)
            except Exception as e:  # a malformed event must never take the daemon down
                self.status.event("bad_event", f"job {job.id}: could not handle trainer event {event!r}: {e!r}",
                                  level="warning")
            self.snapshot()
        if trainer.done:
            self._end_attempt(trainer.exit_status())
            return
        failed = trainer.stop_if_a_rank_failed()
        if failed:
            rank, code = failed
            self.status.event("rank_failed", f"job {job.id}: rank {rank} exited with "
                              f"{launch.describe_status(code)}; stopping the other ranks", level="warning",
                              job_id=job.id, rank=rank, exit_code=code)
        if self.signals >= 2 or self.current.get("cancelled"):
            trainer.cold_stop()
        elif (self.signals or control.is_paused(self.layout)) and trainer.warm_stop():
            self.status.event("stopping", f"job {job.id}: asking the trainer to checkpoint and stop", job_id=job.id)
        elif trainer.stop_overdue(self.cfg.limits.stop_timeout_seconds):
            self.status.event("stop_timeout", f"job {job.id}: trainer did not stop in "
                              f"{self.cfg.limits.stop_timeout_seconds}s; killing it", level="warning")
            trainer.cold_stop()
        elif (silent := trainer.stalled(self.cfg.limits.stall_timeout_seconds,
                                        self.cfg.limits.start_timeout_seconds)) is not None:
            # Hung (a collective, a driver, a dead mount): killed; the attempt is a failed one, the queue goes on.
            last = trainer_events.describe_event(trainer.last_event)
            self.attempt.stalled = f"no event from the trainer for {fmt_duration(silent)} (last event: {last})"
            self.current["phase"] = "stalled"
            self.status.event("stalled", f"job {job.id} stalled: {self.attempt.stalled}; killing its trainer",
                              level="warning", job_id=job.id, silent_s=round(silent, 1), last_event=trainer.last_event)
            trainer.cold_stop()

    def _end_attempt(self, rc: int) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt.trainer:
            attempt.trainer.close()
        job = attempt.job
        faults.check("job_end", job_id=job.id)
        outcome = describe_exit(rc, attempt.job_dir, stop_requested=self.signals > 0 or control.is_paused(self.layout),
                                cancelled=self.current.get("cancelled", False), stalled=attempt.stalled)
        cause = None
        if outcome.kind in (OutcomeKind.FAILED, OutcomeKind.STALLED, OutcomeKind.UNAVAILABLE):
            cause = gate.problem(attempt.cfg, self.layout)
        if cause and outcome.kind != OutcomeKind.UNAVAILABLE:
            # Not the job's fault: what it needed went away under it (the base model mid-load, a GPU off the bus).
            outcome = Outcome(OutcomeKind.UNAVAILABLE, f"{cause} (the attempt failed: {outcome.first_line})")
        attempt.record.update(ended_at=now_iso(), exit_code=rc, outcome=outcome.kind, error=outcome.error)
        if outcome.kind == OutcomeKind.UNAVAILABLE and not cause:
            attempt.record["unconfirmed"] = True  # the trainer saw a cause the daemon's checks do not: bounded
        self._finish(job, attempt.job_dir, attempt.cfg, outcome)
        message, level, fields = gpu.release_report(attempt.gpu_before)
        self.status.event("gpu_memory", f"job {job.id}: {message}", level=level, job_id=job.id, **fields)
        self.current = None
        self.state = "idle"
        self.snapshot(force=True)
        self._prestart()  # after the GPU check: the next trainer must not blur the reading of this one's exit

    def _prestart(self) -> None:
        """Start the next job's trainer now, so that its imports are done before a file arrives."""
        if self.standby is not None or self.signals or (grant := early_grant(self.cfg)) is None:
            return
        if self.once and not self.spool.count(JobStatus.PENDING) and not self._inbox_has_files():
            return  # --once is about to end
        if not self.gate.trainer_lock_held():
            self.standby = start_early(self.layout, grant, self.status)

    def _finish(self, job: Job, job_dir: Path, cfg, outcome: Outcome) -> None:
        """Move the job where the policy says, and say so."""
        micro_batch = job.micro_batch_size or cfg.training.micro_batch_size
        point = resume_point(job_dir)
        decision = policy.decide(outcome, job.attempts, cfg.limits, micro_batch, resume_point=point)
        decision.apply_to(job, now_iso())
        self.spool.move(job, decision.state)
        if decision.state != JobStatus.PENDING:
            self.results.append(decision.state == JobStatus.DONE)
        decision_log.say(self.status, job, job_dir, outcome, decision, micro_batch, point)
        if decision.verdict == Verdict.BLOCKED:
            self.gate.shut_for(outcome.first_line, confirmed=not job.attempts[-1].get("unconfirmed"))
            self.state = "blocked"

    # ------------------------------------------------------------- control
    def _apply(self, req: dict) -> None:
        config = None if req.get("same_config") else control.current_config(self.config_path, self.cfg.root)
        control.apply(self.spool, req.get("action"), req.get("job_id"), config=config, status=self.status,
                      current=self.current)
        if req.get("action") == "resume":
            self.gate.check_now()  # the user says the cause is fixed: look now, not at the next re-check

    # ------------------------------------------------------------- helpers
    def _set_aside_unreadable(self, jobs: list[tuple[Job, Path]]) -> list[tuple[Job, Path]]:
        """Jobs whose job.json cannot be read go to failed/, each a failure of --once; the readable rest."""
        readable, reported = self.spool.set_aside_unreadable(jobs)
        for job in reported:
            self.status.event("job_unreadable", f"job {job.id} {job.state}: {job.error}", level="error",
                              job_id=job.id, adapter=job.adapter, file=job.original_name, error=job.error)
            self.results.append(False)
        return readable

    def _install_signals(self) -> None:
        def on_stop(signum, _frame):
            self.signals += 1
            what = "warm stop: checkpointing the current job" if self.signals == 1 else "cold stop: killing the trainer"
            self.status.event("signal", f"{signal.Signals(signum).name}: {what}", level="warning")

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(self.status, "reopen"):
            signal.signal(signal.SIGHUP, lambda *_: self.status.reopen())

    def _end_paused_once(self) -> None:
        waiting = self.spool.count(JobStatus.PENDING)
        if waiting or self._inbox_has_files():
            self.results.append(False)
        self.status.event("paused", f"paused: run --once ends here; {waiting} pending job(s) wait for "
                          "`training-daemon resume`", level="warning")

    def _inbox_has_files(self) -> bool:
        """For --once: files still to take. One that failed to be claimed does not count (it stays in the inbox,
        reported), or a file that can never be taken would keep `run --once` waiting forever."""
        from daemon.supervisor.intake import scan_inbox

        return any(c.path not in self.intake.claim_failures
                   for c in scan_inbox(self.layout, 0, self.cfg.intake.ignore_suffixes))

    def _clean_publish_leftovers(self) -> None:
        from daemon.versions import clean_staging, repair_latest

        if self.layout.checkpoints.is_dir():
            for adapter_dir in self.layout.checkpoints.iterdir():
                if adapter_dir.is_dir():
                    clean_staging(adapter_dir)
                    for note in repair_latest(adapter_dir):
                        self.status.event("latest_repaired", f"{adapter_dir.name}: {note}", adapter=adapter_dir.name)

    def _config_for(self, job: Job):
        """The job's config, for the checks before it starts: its adapter may name its own base model."""
        try:
            return adapter_config(self.cfg, job.adapter, self.config_path)
        except UserError:
            return self.cfg  # a broken override fails its own job when it starts

    def _show_status(self) -> None:
        """STATUS= for systemd, whenever what the daemon does changes (notify.Notifier.show sends only news)."""
        if self.notifier and self.notifier.enabled:
            self.notifier.show(for_terminal(status_line(  # a file name's newline must not forge a notify field
                self.state, self.current, pending=0 if self.current else self.spool.count(JobStatus.PENDING),
                reason=self.gate.reason if self.state == "blocked" else self.gate.disk_note,
                inbox=str(self.layout.inbox))))

    def snapshot(self, force: bool = False) -> None:
        self._show_status()
        now = time.monotonic()
        if not force and now - self._last_snapshot < 1.0:
            return
        self._last_snapshot = now
        counts = {s.value: self.spool.count(s) for s in JobStatus}
        self.status.snapshot({
            "daemon": {"pid": os.getpid(), "state": self.state, "root": str(self.layout.root), "version": __version__,
                       "started_at": self.started_at, "paused": control.is_paused(self.layout),
                       "blocked": self.gate.as_status()},
            "current": self.current, "queue": counts, "gpu": gpu.snapshot(),
        })

