"""The daemon: watch the inbox, run the jobs (one at a time, or several side by side), record every outcome.

It never imports torch. One loop does everything, a turn at a time: new files, control requests, the
trainers' events and stop requests of every job in training (attempts.py holds a job's attempt; the loop
polls each), then the pending jobs that may start now and where (slots.py). What each outcome means for the
job is policy.py's to say. After a trainer exits, NVML must show its GPUs' memory back. Signals: the first
SIGTERM/SIGINT is a warm stop of every trainer, the second a cold one (rq's worker does the same).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

from daemon import __version__, durable
from daemon.config import adapter_config
from daemon.paths import Layout, UserError
from daemon.supervisor import attempts, control, decision_log, gate, gpu, hooks, launch, policy, slots, web_start
from daemon.supervisor.attempts import Attempt
from daemon.supervisor.intake import Intake
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, resume_point
from daemon.supervisor.policy import Verdict
from daemon.supervisor.spool import Spool
from daemon.supervisor.standby import PREPARED_AHEAD, Standby, early_grant, start_early
from daemon.supervisor.status import LEVEL_ENV, StatusWriter
from daemon.supervisor.status_line import status_line
from daemon.timefmt import now_iso
from daemon.textsafe import for_terminal

PLACE_EVERY_SECONDS = 1.0  # while jobs train: how often the pending ones are looked at (and at once after an end)


class Supervisor:
    def __init__(self, layout: Layout, cfg, config_path: Path | None = None, *, once: bool = False, echo: bool = True):
        self.layout, self.cfg, self.config_path, self.once = layout, cfg, config_path, once
        self.status = StatusWriter(layout, echo=echo, level=os.environ.get(LEVEL_ENV) or cfg.status.log_level)
        self.spool = Spool(layout)
        self.intake = Intake(layout, cfg.intake, self.spool, self.status)
        self.signals = 0
        self._signals_unsaid: list[int] = []  # received, not yet logged: the handler itself takes no lock
        self._signals_said = 0
        self.state = "starting"
        self.running: dict[int, Attempt] = {}  # the jobs in training, by job id, oldest first
        self._next_place = 0.0
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
        kept = attempts.reattach(self)  # Slurm jobs outlive a restart: theirs are running attempts again
        for line in self.spool.sweep(self.cfg.limits.max_attempts, keep=kept):
            self.status.event("sweep", line, level="warning")
        self._clean_publish_leftovers(kept)  # a re-attached Slurm job may be publishing: its staging is its own
        self.web = web_start.start(self.cfg, self.layout, self.status)
        self.intake.start()
        self._prestart()
        if not self.running:
            self.state = "paused" if control.is_paused(self.layout) else "idle"
        self.notifier.ready()  # first: a STATUS= before READY=1 would be the first thing systemd hears
        self.snapshot(force=True)
        try:
            self._loop()
        finally:
            self._say_signals()
            for attempt in self.running.values():
                if attempt.trainer:
                    # The loop itself failed with a trainer running: closing its lifeline makes it exit at once
                    # (the start-up sweep will requeue its job), instead of training on while the daemon winds down.
                    attempt.trainer.close()
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
        """The one loop: each turn does the housekeeping, watches every job in training, then starts the pending
        jobs that may start. A stop (signal) ends it once no trainer runs."""
        while True:
            self._say_signals()
            if self.running:
                self._tick(timeout=0)  # the trainers' events are what this turn waits for
                for attempt in list(self.running.values()):
                    attempts.watch(self, attempt, timeout=0.2 / len(self.running))
                if not self.signals and not control.is_paused(self.layout) and time.monotonic() >= self._next_place:
                    self._place()
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
            placed = self._place()
            if placed == "end":
                return
            if placed is None:
                if self.once and not self._inbox_has_files():
                    return
                # a block is still shown (and re-checked) with nothing to run: the next file would meet it
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
    def pool(self) -> slots.Pool | None:
        """What jobs are placed on now (slots.py); None while the GPUs `gpus` asks for are not all there."""
        devices = None
        if self.cfg.executor == "local":  # Slurm jobs take no device of this host
            if gpu.gone_devices():  # a GPU seen earlier is gone (or NVML is silent): not CPU slots, not fewer GPUs
                return None
            try:
                devices = launch.grant(self.cfg.gpus, self.cfg.cpu_processes, gpu.visible_devices()).devices
            except UserError:
                return None
        return slots.Pool.of(devices, cpu_processes=self.cfg.cpu_processes, max_parallel=self.cfg.max_parallel_jobs,
                             executor=self.cfg.executor)

    def _single(self, pool: slots.Pool) -> bool:
        """One job at a time (today's mode): the only one where the next trainer is started early."""
        return self.cfg.executor == "local" and (pool.single or (pool.gpus and self.cfg.gpus_per_job == "all"))

    def _place(self) -> str | None:
        """Start the pending jobs that may start now (slots.next_jobs). None: nothing is pending; "end": a
        --once run with nothing running meets a wait nothing will end (its jobs stay pending); else "placed"."""
        self._next_place = time.monotonic() + PLACE_EVERY_SECONDS
        attempts.go_if_free(self)  # a prepared job whose go a closed gate held back
        self._prestart()  # the early trainer just took a job: the next one imports while both wait
        pending = self._set_aside_unreadable(self.spool.list(JobStatus.PENDING))
        if not pending:
            return None
        by_id = {job.id: (job, job_dir) for job, job_dir in pending}
        pool = self.pool()
        if pool is None:  # the GPUs `gpus` asks for are gone: the gate blocks the queue, with why
            return self._wait(pending[0][0], locks=None) or "placed"
        early = self._prepares_early(pool)
        if len(self.running) >= pool.limit and not early:
            return "placed"
        configs: dict[str, object] = {}
        for job, _ in pending:
            configs.setdefault(job.adapter, self.config_for(job))
        candidates = [slots.Candidate(job.id, job.adapter, configs[job.adapter].gpus_per_job,
                                      held=job.duplicate_of is not None) for job, _ in pending]
        # Preparing early, the next job is chosen as if the running one had ended: it only prepares until then.
        taken = {} if early else {
            jid: slots.Taken(a.job.adapter, tuple(a.record.get("devices") or [a.record.get("slot")]))
            for jid, a in self.running.items()}
        for choice in slots.next_jobs(candidates, taken, pool):
            job, job_dir = by_id[choice.job_id]
            if isinstance(choice, slots.Misfit):
                attempts.fail_bad_config(self, job, job_dir, choice.message)
                continue
            if early and (self.standby is None or not self.standby.usable_for(choice.grant)):
                return "placed"  # not a job for the early trainer: it starts the ordinary way once the GPU is free
            locks = None if self.standby is not None or pool.executor == "slurm" else \
                launch.lock_names(choice.grant, choice.slot)
            wait = self._wait(job, locks)
            if wait is not None:  # no backfill: the jobs behind it wait too
                return wait
            attempts.start(self, job, job_dir, choice, slots.describe_slot(choice, pool))
        return "placed"

    def _wait(self, job: Job, locks: list[str] | None) -> str | None:
        """What the job waits for before it may start (gate.Gate.wait_state), as the daemon's state while
        nothing runs; None when it may start. A --once run with nothing to wait for gives up (False result)."""
        wait = self.gate.wait_state(self.config_for(job), self.cfg.limits.min_free_disk_mb, locks=locks)
        if wait is None:
            return None
        if not self.running:
            self.state = wait
            if self.once and wait != "waiting_for_trainer":  # nothing will fix it for us: they stay pending
                self.results.append(False)
                return "end"
        return "placed"

    def job_ended(self) -> None:
        """After attempts.end (its GPU check done): the prepared next job gets its go, the queue is looked at
        at once, and the next trainer is started early."""
        self._next_place = 0.0
        attempts.go_if_free(self)
        self.snapshot(force=True)
        self._prestart()

    def _prestart(self) -> None:
        """Start the next job's trainer now, so that its imports are done before a file arrives or the job in
        training ends. One idle early trainer at most, and none once PREPARED_AHEAD jobs are prepared."""
        if self.standby is not None or self.signals or self.cfg.executor != "local":
            return
        if sum(a.gated for a in self.running.values()) >= PREPARED_AHEAD:
            return
        if any(not a.gated and not a.stepped for a in self.running.values()):
            return  # its imports would compete for the host with the loading and first step of the job on the GPU
        pool = self.pool()
        if pool is None or not self._single(pool) or (grant := early_grant(self.cfg)) is None:
            return
        if self.once and not self.spool.count(JobStatus.PENDING) and not self._inbox_has_files():
            return  # --once is about to end
        self.standby = start_early(self.layout, grant, self.status)

    def _prepares_early(self, pool: slots.Pool) -> bool:
        """A job trains and the early trainer waits for a job: hand it the next one now (standby.py), unless
        PREPARED_AHEAD jobs are prepared already. It prepares on the CPU and trains only once the GPU is free;
        per-adapter order holds, since only one job is past the GPU gate at a time and they pass it in the order
        they were handed over (job id order)."""
        if self.standby is None or not self.running or not self._single(pool):
            return False
        if sum(a.gated for a in self.running.values()) >= PREPARED_AHEAD:
            return False
        if not self.standby.usable_for(early_grant(self.cfg) or self.standby.grant):
            self.standby.discard()  # died while idle (or the GPUs changed): _prestart starts another
            self.standby = None
            return False
        return True

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
                      running={job_id: a.current for job_id, a in self.running.items()})
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
        # A handler runs on the main thread between any two bytecodes, perhaps inside the status writer's lock
        # (not reentrant): it only counts, and the loop says what it means at its next turn (_say_signals).
        def on_stop(signum, _frame):
            self.signals += 1
            self._signals_unsaid.append(signum)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(self.status, "reopen"):
            signal.signal(signal.SIGHUP, lambda *_: self.status.reopen())
        # `kill -USR2 <pid>`: every thread's stack to stderr (the journal under systemd), for a daemon that hangs.
        faulthandler.register(signal.SIGUSR2, all_threads=True)

    def _say_signals(self) -> None:
        while self._signals_unsaid:
            signum = self._signals_unsaid.pop(0)
            self._signals_said += 1
            what = ("warm stop: checkpointing the running jobs" if self._signals_said == 1
                    else "cold stop: killing the trainers")
            self.status.event("signal", f"{signal.Signals(signum).name}: {what}", level="warning")

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

    def _clean_publish_leftovers(self, kept: set[int] = frozenset()) -> None:
        from daemon.versions import clean_staging, repair_latest

        if self.layout.checkpoints.is_dir():
            for adapter_dir in self.layout.checkpoints.iterdir():
                if adapter_dir.is_dir():
                    clean_staging(adapter_dir, skip_jobs=kept)
                    for note in repair_latest(adapter_dir):
                        self.status.event("latest_repaired", f"{adapter_dir.name}: {note}", adapter=adapter_dir.name)

    def config_for(self, job: Job):
        """The job's config, for the checks before it starts: its adapter may name its own base model."""
        try:
            return adapter_config(self.cfg, job.adapter, self.config_path)
        except UserError:
            return self.cfg  # a broken override fails its own job when it starts

    @property
    def current(self) -> dict | None:
        """The oldest job in training, as status.json's `current` shows it (before several could run)."""
        return next(iter(self.running.values())).current if self.running else None

    def _show_status(self) -> None:
        """STATUS= for systemd, whenever what the daemon does changes (notify.Notifier.show sends only news)."""
        if self.notifier and self.notifier.enabled:
            self.notifier.show(for_terminal(status_line(  # a file name's newline must not forge a notify field
                self.state, self.current, running=[a.current for a in self.running.values()],
                pending=0 if self.current else self.spool.count(JobStatus.PENDING),
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
                       "blocked": self.gate.as_status(),
                       # running: jobs whose trainer has its devices; prepared: early trainers waiting for them
                       "parallel": {"running": sum(not a.gated for a in self.running.values()),
                                    "prepared": sum(a.gated for a in self.running.values()),
                                    # an adapter's own gpus_per_job may run more than the top level's says
                                    "max": max(sum(not a.gated for a in self.running.values()),
                                               self._max_parallel() or 0) or None}},
            "running": [a.current for a in self.running.values()], "current": self.current,
            "queue": counts, "gpu": gpu.snapshot(),
        })

    def _max_parallel(self) -> int | None:
        pool = self.pool()
        if pool is None:
            return None
        return 1 if self._single(pool) else pool.limit
