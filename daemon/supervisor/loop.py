"""The daemon: watch the inbox, run one trainer child at a time, record every outcome.

It never imports torch. Each job runs in `python -m daemon.trainer.main` in its own process group; the
daemon reads the child's JSON events, forwards stop requests (SIGUSR1 = checkpoint and exit), kills the
group on a cold stop, and checks with NVML that GPU memory came back after the child exited.
Signals: the first SIGTERM/SIGINT is a warm stop, the second a cold one (rq's worker does the same).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path

from daemon import __version__, durable, faults
from daemon.supervisor import control
from daemon import protocol
from daemon.supervisor import gpu
from daemon.supervisor import launch
from daemon.config import adapter_config, effective_dict
from daemon.supervisor.intake import Intake
from daemon.supervisor.standby import Standby
from daemon.supervisor.job import Job, JobStatus
from daemon.paths import PROJECT_DIR, Layout, UserError
from daemon.supervisor.spool import Spool
from daemon.supervisor.status import LEVEL_ENV, StatusWriter, now_iso
from daemon.supervisor.outcome import Outcome, describe_exit, fmt_eta


class Supervisor:
    def __init__(self, layout: Layout, cfg, config_path: Path | None = None, *, once: bool = False, echo: bool = True):
        self.layout, self.cfg, self.config_path, self.once = layout, cfg, config_path, once
        self.status = StatusWriter(layout, echo=echo, level=os.environ.get(LEVEL_ENV) or cfg.status.log_level)
        self.spool = Spool(layout)
        self.intake = Intake(layout, cfg.intake, self.spool, self.status)
        self.signals = 0
        self.state = "starting"
        self.current: dict | None = None
        self.child: launch.Ranks | None = None  # the current job's trainer processes
        self.results: list[bool] = []
        self.web = None
        self.standby = None  # the next job's trainer, started early (daemon/standby.py)
        self.notifier = None
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
        self.status.event("daemon_started", f"training-daemon {__version__} started on {self.layout.root} (pid {os.getpid()})",
                          pid=os.getpid(), root=str(self.layout.root))
        for line in self.spool.sweep(self.cfg.limits.max_attempts):
            self.status.event("sweep", line, level="warning")
        self._clean_publish_leftovers()
        self._start_web()
        self.intake.start()
        self._prestart()
        self.state = "paused" if control.is_paused(self.layout) else "idle"
        self.snapshot(force=True)
        self.notifier.ready()
        self.notifier.status("idle: watching " + str(self.layout.inbox))
        try:
            self._loop()
        finally:
            self.state = "stopping"
            self.notifier.stopping()
            self.intake.stop()
            if self.web:
                self.web.stop()
            self._discard_standby()
            self.snapshot(force=True)
            self.status.event("daemon_stopped", "training-daemon stopped")
            self.lock.release()
        if self.once:
            # A --once run stopped by a signal before the queue was drained did not do what it was asked.
            left = self.spool.count(JobStatus.PENDING) if self.signals else 0
            return 0 if all(self.results) and not self.intake.claim_failures and not left else 1
        return 0

    def _loop(self) -> None:
        while not self.signals:
            self._tick(timeout=0.5)
            if self.signals:
                break
            if control.is_paused(self.layout):
                self.state = "paused"
                if self.once:  # nobody will resume a --once run: end it, the jobs stay pending
                    self._end_paused_once()
                    return
                continue
            pending = self.spool.list(JobStatus.PENDING)
            if pending:
                if not self._disk_ok():
                    if self.once:  # nothing will free the disk for us: the jobs stay pending, intact
                        self.results.append(False)
                        return
                    continue
                if self.standby is None and not self._trainer_lock_free():
                    continue
                job, job_dir = pending[0]
                self.run_job(job, job_dir)
            elif self.once and not self._inbox_has_files():
                return
            else:
                self.state = "idle"

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
    def run_job(self, job: Job, job_dir: Path) -> None:
        # The attempt is written down in running/ before anything can fail: if the daemon dies from here on,
        # sweep() counts it, so no job can crash the daemon more than max_attempts times.
        job_dir = self.spool.move(job, JobStatus.RUNNING)
        attempt = {"n": len(job.attempts) + 1, "started_at": now_iso(), "micro_batch_size": job.micro_batch_size}
        job.started_at = job.started_at or attempt["started_at"]
        job.attempts.append(attempt)
        job.save(job_dir)
        try:  # an adapter override may have been added or broken since the daemon started
            cfg = adapter_config(self.cfg, job.adapter, self.config_path)
        except UserError as e:
            durable.write_json(job_dir / "error.json", {"kind": "bad_config", "message": str(e), "at": now_iso()})
            attempt.update(ended_at=now_iso(), outcome="bad_config", error=str(e))
            self._finish(job, job_dir, self.cfg, Outcome("bad_config", str(e)))
            return
        attempt["micro_batch_size"] = job.micro_batch_size or cfg.training.micro_batch_size
        snapshot_path = job_dir / "config.json"
        if not snapshot_path.exists():
            durable.write_json(snapshot_path, effective_dict(cfg))
        job.save(job_dir)
        self.current = {"job_id": job.id, "adapter": job.adapter, "file": job.original_name, "phase": "starting",
                        "started_at": attempt["started_at"], "step": 0, "total_steps": None, "arrived_unix": None}
        self.state = "training"
        self.status.event("job_started", f"job {job.id} started: {job.original_name} -> adapter {job.adapter} "
                          f"(attempt {attempt['n']})", job_id=job.id, adapter=job.adapter, attempt=attempt["n"])
        gpu_before = gpu.snapshot()
        faults.check("job_start", job_id=job.id)
        rc = self._run_child(job, job_dir)
        faults.check("job_end", job_id=job.id)
        outcome = describe_exit(rc, job_dir, stop_requested=self.signals > 0 or control.is_paused(self.layout),
                                cancelled=self.current.get("cancelled", False))
        attempt.update(ended_at=now_iso(), exit_code=rc, outcome=outcome.kind, error=outcome.error)
        self._finish(job, job_dir, cfg, outcome)
        self._check_gpu_memory(job, gpu_before)
        self.current = None
        self.state = "idle"
        self.snapshot(force=True)
        self._prestart()  # after the GPU check: the next trainer must not blur the reading of this one's exit

    def _run_child(self, job: Job, job_dir: Path) -> int:
        try:
            grant = launch.grant(self.cfg.gpus, self.cfg.cpu_processes, gpu.visible_devices())
        except UserError as e:  # retrying cannot help until the config or the machine changes
            durable.write_json(job_dir / "error.json", {"kind": "bad_config", "message": str(e), "at": now_iso()})
            return protocol.BAD_INPUT
        # This attempt's first failing rank writes it; one left by an earlier attempt would speak for this one.
        (job_dir / "error.json").unlink(missing_ok=True)
        if grant.processes > 1 or grant.devices is not None:
            self.status.event("launch", f"job {job.id}: training on {grant.describe()}",
                              level="info" if grant.processes > 1 else "debug", job_id=job.id,
                              processes=grant.processes, devices=grant.devices)
        life_w = self._take_standby(grant, job, job_dir)
        if life_w is None:
            lock_fd = self._trainer_lock()
            life_r, life_w = os.pipe()
            cmd = launch.trainer_command(job_dir, self.layout.root, life_r, os.getpid(), job.micro_batch_size)
            try:
                self.child = launch.start(cmd, grant, self._trainer_env(), job_dir, pass_fds=(life_r, lock_fd),
                                          cwd=self.layout.root)
            finally:
                os.close(life_r)
                os.close(lock_fd)  # the ranks hold the trainer lock until the last exits, even if we die first
        events: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_events, args=(self.child.stdout, events), daemon=True)
        reader.start()
        stop_sent_at = None
        try:
            while True:
                try:
                    event = events.get(timeout=0.2)
                except queue.Empty:
                    event = None
                if event is not None:
                    try:
                        self._on_event(job, event)
                    except Exception as e:  # a malformed event must never take the daemon down
                        self.status.event("bad_event", f"job {job.id}: could not handle trainer event {event!r}: {e!r}",
                                          level="warning")
                # Below runs after every event too: a trainer reporting faster than every 0.2 s must not
                # keep a stop request or a dead rank waiting.
                if self.child.poll() is not None and not reader.is_alive() and events.empty():
                    break
                self._tick(timeout=0)
                failed = self.child.failed_rank()
                if failed:
                    rank, code = failed
                    self.status.event("rank_failed", f"job {job.id}: rank {rank} exited with "
                                      f"{launch.describe_status(code)}; stopping the other ranks", level="warning",
                                      job_id=job.id, rank=rank, exit_code=code)
                    self._kill_child()
                if self.signals >= 2 or self.current.get("cancelled"):
                    self._kill_child()
                elif (self.signals or control.is_paused(self.layout)) and stop_sent_at is None:
                    self.status.event("stopping", f"job {job.id}: asking the trainer to checkpoint and stop",
                                      job_id=job.id)
                    self._signal_child(signal.SIGUSR1)
                    stop_sent_at = time.monotonic()
                elif stop_sent_at and time.monotonic() - stop_sent_at > self.cfg.limits.stop_timeout_seconds:
                    self.status.event("stop_timeout", f"job {job.id}: trainer did not stop in "
                                      f"{self.cfg.limits.stop_timeout_seconds}s; killing it", level="warning")
                    self._kill_child()
            return self.child.wait()
        finally:
            os.close(life_w)
            self.child = None

    def _trainer_env(self) -> dict:
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]),
                    PYTHONUNBUFFERED="1")

    def _prestart_wanted(self) -> bool:
        setting = self.cfg.trainer_prestart
        return setting == "true" or (setting == "auto" and bool(gpu.visible_devices()))

    def _prestart(self) -> None:
        """Start the next job's trainer now, so that its imports are done before a file arrives."""
        if self.standby is not None or self.signals or not self._prestart_wanted():
            return
        if self.once and not self.spool.count(JobStatus.PENDING) and not self._inbox_has_files():
            return  # --once is about to end
        try:
            grant = launch.grant(self.cfg.gpus, self.cfg.cpu_processes, gpu.visible_devices())
        except UserError:
            return  # the job will fail with the reason; nothing to prepare
        if grant.processes != 1 or not self._trainer_lock_free():
            return
        try:
            self.standby = Standby.start(self.layout.root, self.layout.state / "standby.log", grant,
                                         self._trainer_env(), self._trainer_lock())
        except (OSError, RuntimeError) as e:
            self.status.event("standby", f"could not start the next trainer early: {e}", level="warning")
            return
        self.status.event("standby", f"next trainer started early (pid {self.standby.pid})", level="debug",
                          pid=self.standby.pid)

    def _take_standby(self, grant, job: Job, job_dir: Path) -> int | None:
        """Give the job to the pre-started trainer if it fits; its lifeline's write end, else None."""
        standby, self.standby = self.standby, None
        if standby is None:
            return None
        if standby.usable_for(grant):
            try:
                self.child, life_w = standby.take(job_dir, job.micro_batch_size)
                self.status.event("launch", f"job {job.id}: trainer started early (pid {standby.pid})",
                                  level="debug", job_id=job.id, pid=standby.pid)
                return life_w
            except OSError:
                pass  # it died a moment ago
        standby.discard()
        return None

    def _discard_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.discard()

    def _trainer_lock(self) -> int:
        """Never two trainers: wait for a trainer left by a dead daemon (its lifeline makes it exit)."""
        path = self.layout.state / "trainer.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError("a trainer from an earlier daemon still holds state/trainer.lock")
                time.sleep(0.2)

    def _signal_child(self, sig: int) -> None:
        if self.child:
            self.child.send_signal(sig)

    def _kill_child(self) -> None:
        if self.child:
            self.child.kill()

    def _on_event(self, job: Job, ev: dict) -> None:
        kind = ev.get("event")
        cur = self.current
        if kind == "phase":
            cur["phase"] = ev["phase"]
            if ev.get("total_steps") is not None:
                cur["total_steps"] = ev["total_steps"]
            if ev["phase"] == "saving" and self.notifier:
                self.notifier.extend_timeout(int(self.cfg.limits.stop_timeout_seconds * 1e6))
            self.status.event("phase", f"job {job.id}: {ev['phase']}", level="debug", job_id=job.id, **ev)
        elif kind == "progress":
            cur.update({k: ev.get(k) for k in ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s",
                                               "eta_s", "gpu_mem_gib")})
            gpu_txt = f" GPU {ev['gpu_mem_gib']:.2f} GiB" if ev.get("gpu_mem_gib") is not None else ""
            self.status.event("progress", f"job {job.id} step {ev['step']}/{ev['total_steps']} loss {ev['loss']:.4f} "
                              f"{ev['tokens_per_s']:.0f} tok/s ETA {fmt_eta(ev.get('eta_s'))}{gpu_txt}",
                              job_id=job.id, **{k: v for k, v in ev.items() if k not in ("event", "ts")})
            if self.notifier:
                self.notifier.status(f"training job {job.id} ({job.adapter}): step {ev['step']}/{ev['total_steps']}, "
                                     f"loss {ev['loss']:.4f}, ETA {fmt_eta(ev.get('eta_s'))}")
        elif kind == "first_step":
            self.status.event("first_step", f"job {job.id}: first optimizer step done (loss {ev['loss']:.4f})",
                              job_id=job.id, loss=ev["loss"])
        elif kind == "eval":
            cur["eval_loss"] = ev["eval_loss"]
            self.status.event("eval", f"job {job.id}: eval loss {ev['eval_loss']:.4f}", job_id=job.id,
                              step=ev.get("step"), eval_loss=ev["eval_loss"])
        elif kind == "validated":
            self.status.event("validated", f"job {job.id}: {ev['examples']} examples, {ev['tokens']} tokens, "
                              f"{ev['skipped']} skipped", job_id=job.id, examples=ev["examples"],
                              tokens=ev["tokens"], skipped=ev["skipped"])
        elif kind in ("checkpoint", "resumed", "log", "published", "invalid", "saving"):
            msg = {"checkpoint": f"checkpoint at step {ev.get('step')}",
                   "resumed": f"resumed from {ev.get('checkpoint')} (step {ev.get('step')})",
                   "published": f"published version {ev.get('version')}",
                   "invalid": "input rejected by validation", "saving": f"saving at step {ev.get('step')}"
                   }.get(kind, ev.get("message", ""))
            self.status.event(kind, f"job {job.id}: {msg}", level="debug" if kind == "saving" else "info",
                              job_id=job.id, **{k: v for k, v in ev.items() if k not in ("event", "ts", "message")})
        self.snapshot()

    def _finish(self, job: Job, job_dir: Path, cfg, outcome: Outcome) -> None:
        limits = cfg.limits
        if outcome.kind == "done":
            job.version = outcome.version
            job.finished_at = now_iso()
            job.error = None
            self.spool.move(job, JobStatus.DONE)
            self.results.append(True)
            self.status.event("job_done", f"job {job.id} done: {job.adapter} v{outcome.version} at {outcome.path}",
                              job_id=job.id, version=outcome.version, path=outcome.path)
            return
        if outcome.kind in ("stopped", "cold_stopped"):  # the user's doing: not an attempt that failed
            point = _resume_point(job_dir)
            job.note = f"{outcome.error} ({f'resume point: {point}' if point else 'no checkpoint yet: it starts over'})"
            self.spool.move(job, JobStatus.PENDING)
            self.status.event("job_paused", f"job {job.id} back to pending: {job.note}", job_id=job.id,
                              resume_point=point)
            return
        if outcome.kind == "disk_full":
            full = [a for a in _since_retry(job.attempts) if a.get("outcome") == "disk_full"]
            if len(full) < limits.max_attempts:  # counted: a disk that fills at every try must not loop forever
                job.note = outcome.error
                self.spool.move(job, JobStatus.PENDING)
                self.status.event("disk_full", f"job {job.id} paused, disk full (attempt {len(full)} of "
                                  f"{limits.max_attempts}): {outcome.error}; input and earlier versions are intact",
                                  level="error", job_id=job.id)
                return
            outcome.error = "disk full; input and earlier versions are intact\n\n" + "\n\n".join(
                f"attempt {a['n']}: {a.get('error')}" for a in full)
        if outcome.kind == "out_of_memory":
            sizes = [a.get("micro_batch_size") for a in job.attempts if a.get("outcome") == "out_of_memory"]
            current = job.micro_batch_size or cfg.training.micro_batch_size
            if len(sizes) <= limits.oom_retries and current > 1:
                job.micro_batch_size = max(1, current // 2)
                self.spool.move(job, JobStatus.PENDING)
                self.status.event("oom_retry", f"job {job.id}: out of memory at micro-batch {current}; retrying with "
                                  f"{job.micro_batch_size} and {current // job.micro_batch_size}x the accumulation "
                                  "(same effective batch)", level="warning", job_id=job.id)
                return
            outcome.error = (f"out of memory with micro-batch sizes {', '.join(map(str, sizes))} "
                             f"(oom_retries={limits.oom_retries}): {outcome.error}")
        elif outcome.kind == "failed":
            failures = [a for a in _since_retry(job.attempts) if a.get("outcome") in ("failed", "interrupted")]
            if len(failures) < limits.max_attempts:
                job.error = outcome.error
                self.spool.move(job, JobStatus.PENDING)
                self.status.event("job_retry", f"job {job.id} failed (attempt {len(failures)} of "
                                  f"{limits.max_attempts}), will retry: {outcome.first_line}", level="warning",
                                  job_id=job.id)
                return
            outcome.error = "\n\n".join(f"attempt {a['n']}: {a.get('error')}" for a in failures)
        job.error = outcome.error
        job.finished_at = now_iso()
        self.spool.move(job, JobStatus.FAILED)
        self.results.append(False)
        self.status.event("job_failed", f"job {job.id} failed: {outcome.first_line} (details: {job_dir.name}/error.json)",
                          level="error", job_id=job.id, error=outcome.error)

    def _check_gpu_memory(self, job: Job, before: dict | None) -> None:
        if before is None:
            self.status.event("gpu_memory", f"job {job.id}: GPU memory not checked: no GPU visible to NVML", released=None)
            return
        start = time.monotonic()
        after = gpu.snapshot()
        while after and after["mem_used_gib"] > before["mem_used_gib"] + 0.25 and time.monotonic() - start < 15:
            time.sleep(0.25)
            after = gpu.snapshot()
        took = time.monotonic() - start
        back = after is not None and after["mem_used_gib"] <= before["mem_used_gib"] + 0.25
        self.status.event("gpu_memory", f"job {job.id}: GPU memory before {before['mem_used_gib']:.2f} GiB, after "
                          f"{after['mem_used_gib'] if after else float('nan'):.2f} GiB"
                          + (f" (back in {took:.1f}s)" if back else " - NOT released"),
                          level="info" if back else "warning", job_id=job.id, before_gib=before["mem_used_gib"],
                          after_gib=after["mem_used_gib"] if after else None, released=back, seconds=round(took, 2))

    # ------------------------------------------------------------- control
    def _apply(self, req: dict) -> None:
        action, job_id = req.get("action"), req.get("job_id")
        if action == "pause":
            control.paused_flag(self.layout).touch()
            self.status.event("paused", "paused: no new job starts; a running job checkpoints and waits")
        elif action == "resume":
            control.paused_flag(self.layout).unlink(missing_ok=True)
            self.status.event("resumed", "resumed")
        elif action == "cancel":
            if self.current and self.current["job_id"] == job_id:
                self.current["cancelled"] = True
                return
            self._control_reply("cancel", control.cancel_job, job_id)
        elif action == "retry":
            self._control_reply("retry", control.retry_job, job_id)

    def _control_reply(self, kind: str, action, job_id) -> None:
        try:
            self.status.event(kind, action(self.spool, job_id))
        except UserError as e:  # refused: said once, and the daemon goes on
            self.status.event(kind, str(e), level="warning", job_id=job_id)

    # ------------------------------------------------------------- helpers
    def _install_signals(self) -> None:
        def on_stop(signum, _frame):
            self.signals += 1
            what = "warm stop: checkpointing the current job" if self.signals == 1 else "cold stop: killing the trainer"
            self.status.event("signal", f"{signal.Signals(signum).name}: {what}", level="warning")

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(self.status, "reopen"):
            signal.signal(signal.SIGHUP, lambda *_: self.status.reopen())

    def _start_web(self) -> None:
        web = self.cfg.status.web
        if not web.enabled:
            return
        try:
            from daemon.supervisor.web import start_web

            self.web = start_web(self.layout, web.host, web.port)
            self.status.event("web", f"status page at {self.web.url}", url=self.web.url)
        except OSError as e:
            self.status.event("web", f"status page not started ({web.host}:{web.port}): {e}", level="warning")

    def _disk_ok(self) -> bool:
        free_mb = shutil.disk_usage(self.layout.root).free / 2**20
        if free_mb >= self.cfg.limits.min_free_disk_mb:
            return True
        if self.state != "waiting_for_disk":
            self.status.event("disk_low", f"only {free_mb:.0f} MiB free (floor {self.cfg.limits.min_free_disk_mb} MiB): "
                              "waiting before the next job", level="error")
        self.state = "waiting_for_disk"
        time.sleep(1)
        return False

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

    def _trainer_lock_free(self) -> bool:
        """Never two trainers: a trainer left by a dead daemon holds state/trainer.lock until its lifeline makes
        it exit. Until then, wait here, still watching the inbox and the signals."""
        fd = os.open(self.layout.state / "trainer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if self.state != "waiting_for_trainer":
                self.status.event("waiting_for_trainer", "a trainer from an earlier daemon still holds "
                                  "state/trainer.lock; waiting for it to exit", level="warning")
            self.state = "waiting_for_trainer"
            return False
        finally:
            os.close(fd)  # closing drops the probe's lock

    def _clean_publish_leftovers(self) -> None:
        from daemon.versions import clean_staging, repair_latest

        if self.layout.checkpoints.is_dir():
            for adapter_dir in self.layout.checkpoints.iterdir():
                if adapter_dir.is_dir():
                    clean_staging(adapter_dir)
                    repair_latest(adapter_dir)

    def snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_snapshot < 1.0:
            return
        self._last_snapshot = now
        counts = {s: self.spool.count(s) for s in ("pending", "running", "done", "failed")}
        self.status.snapshot({
            "daemon": {"pid": os.getpid(), "state": self.state, "root": str(self.layout.root), "version": __version__,
                       "started_at": self.started_at, "paused": control.is_paused(self.layout)},
            "current": self.current, "queue": counts, "gpu": gpu.snapshot(),
        })


def _read_events(stream, events: queue.Queue) -> None:
    for raw in stream:
        try:
            ev = json.loads(raw)
            if isinstance(ev, dict):
                events.put(ev)
        except ValueError:
            events.put({"event": "log", "message": raw.decode(errors="replace").rstrip()})


def _resume_point(job_dir: Path) -> str | None:
    """The newest complete checkpoint of a job (checkpoint.py's rule, read without importing torch)."""
    resume = job_dir / "resume"
    names = [p.name for p in resume.glob("step-*") if (p / "COMPLETE").exists()] if resume.is_dir() else []
    return max(names, default=None)


def _since_retry(attempts: list[dict]) -> list[dict]:
    for i in range(len(attempts) - 1, -1, -1):
        if attempts[i].get("outcome") == "retried_by_user":
            return attempts[i + 1:]
    return attempts
