"""One job's attempt, from its start to its trainer's end: the per-job half of the daemon's loop.

The loop (loop.py) holds every running attempt in `Supervisor.running`, keyed by job id, and each turn calls
watch() on each; start() puts an attempt there, end() takes it out. Several can run at once (slots.py says
where), each with its own trainer handle (executor.py): a local TrainerProcess or a Slurm job. What an
outcome means for the job is policy.py's to say (Supervisor._finish). No torch here: the daemon imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon import durable, faults, protocol
from daemon.config import DaemonConfig, adapter_config, effective_dict
from daemon.paths import UserError
from daemon.protocol import ErrorKind, Event
from daemon.supervisor import control, gate, gpu, launch, trainer_events
from daemon.supervisor.executor import TrainerHandle
from daemon.supervisor.job import Job, JobStatus
from daemon.supervisor.outcome import Outcome, OutcomeKind, describe_exit, write_error
from daemon.supervisor.slots import Start
from daemon.supervisor.trainer_process import TrainerProcess
from daemon.timefmt import fmt_duration, now_iso

NOT_CHECKED_ON_SLURM = "GPUs on Slurm nodes: not checked by the daemon"


@dataclass
class Attempt:
    """A job in training, from its start to its trainer's exit."""

    job: Job
    job_dir: Path
    cfg: DaemonConfig  # with the adapter's overrides
    record: dict  # its entry in job.attempts
    current: dict  # the job as status.json's `running` shows it
    executor: str = "local"
    devices: tuple[str, ...] | None = None  # its GPUs; None on the CPU or Slurm
    gpu_before: dict | None = None
    trainer: TrainerHandle | None = None
    stalled: str | None = None  # why the daemon killed its trainer for silence, if it did
    stepped: bool = False  # its trainer did its first optimizer step (loading is over)

    @property
    def gated(self) -> bool:
        """Its trainer (the early one, standby.py) has not had the go: it prepares on the CPU or waits for the
        GPU, holding no device lock."""
        return bool(getattr(self.trainer, "gated", False))


def _begin(sup, job: Job, extra: dict) -> tuple[Path, dict]:
    # The attempt is written down in running/ before anything can fail: if the daemon dies from here on,
    # sweep() counts it, so no job can crash the daemon more than max_attempts times.
    job_dir = sup.spool.move(job, JobStatus.RUNNING)
    record = {"n": len(job.attempts) + 1, "started_at": now_iso(), "micro_batch_size": job.micro_batch_size,
              **extra}
    job.started_at = job.started_at or record["started_at"]
    job.attempts.append(record)
    job.save(job_dir)
    return job_dir, record


def fail_bad_config(sup, job: Job, job_dir: Path, message: str, record: dict | None = None) -> None:
    """The job cannot start with its config (a broken adapter override, more GPUs than there are): it fails
    with why, as one attempt; the daemon goes on."""
    if record is None:
        job_dir, record = _begin(sup, job, {})
    write_error(job_dir, ErrorKind.BAD_CONFIG, message)
    record.update(ended_at=now_iso(), outcome=OutcomeKind.BAD_CONFIG, error=message)
    sup._finish(job, job_dir, sup.cfg, Outcome(OutcomeKind.BAD_CONFIG, message))


def _current(job: Job, record: dict, slot: str | None, devices, executor: str) -> dict:
    return {"job_id": job.id, "adapter": job.adapter, "file": job.original_name, "phase": "starting",
            "started_at": record["started_at"], "step": 0, "total_steps": None, "arrived_unix": None,
            "devices": list(devices) if devices is not None else None, "slot": slot, "executor": executor,
            **({"slurm_job_id": record.get("slurm_job_id")} if executor == "slurm" else {})}


def start(sup, job: Job, job_dir: Path, place: Start, where: str) -> None:
    """Start the job's attempt on `place` (slots.next_jobs); `where` says where, for its status line."""
    executor = sup.cfg.executor
    devices = place.grant.devices if executor == "local" else None
    job_dir, record = _begin(sup, job, {"executor": executor, "slot": place.slot,
                                        "devices": list(devices) if devices is not None else None})
    try:  # an adapter override may have been added or broken since the daemon started
        cfg = adapter_config(sup.cfg, job.adapter, sup.config_path)
    except UserError as e:
        fail_bad_config(sup, job, job_dir, str(e), record)
        return
    record["micro_batch_size"] = job.micro_batch_size or cfg.training.micro_batch_size
    snapshot_path = job_dir / "config.json"
    if not snapshot_path.exists():
        durable.write_json(snapshot_path, effective_dict(cfg))
    job.save(job_dir)
    attempt = Attempt(job, job_dir, cfg, record, _current(job, record, place.slot, devices, executor),
                      executor=executor, devices=devices)
    sup.running[job.id] = attempt
    sup.state = "training"
    sup.status.event("job_started", f"job {job.id} started: {job.original_name} -> adapter {job.adapter} "
                     f"(attempt {record['n']}) {where}", job_id=job.id, adapter=job.adapter, attempt=record["n"],
                     slot=place.slot, devices=record["devices"], executor=executor)
    if executor == "local":
        attempt.gpu_before = gpu.snapshot(devices)
    faults.check("job_start", job_id=job.id)
    # This attempt's first failing rank writes it; one left by an earlier attempt would speak for this one.
    (job_dir / "error.json").unlink(missing_ok=True)
    if executor == "slurm":
        _start_on_slurm(sup, attempt)
    else:
        _start_local(sup, attempt, place)


def _start_local(sup, attempt: Attempt, place: Start) -> None:
    job, grant = attempt.job, place.grant
    if grant.processes > 1 or grant.devices is not None:
        sup.status.event("launch", f"job {job.id}: training on {grant.describe()}",
                         level="info" if grant.processes > 1 else "debug", job_id=job.id,
                         processes=grant.processes, devices=grant.devices)
    standby, sup.standby = sup.standby, None
    # Handed to the early trainer while another job trains (loop.py: _place): only it may take the job, since
    # the running trainer holds the device locks a fresh one would wait for. (Side by side, on other devices,
    # there is no early trainer: each job's is started fresh.)
    others = [a for a in sup.running.values() if a is not attempt]
    try:
        trainer = TrainerProcess.start(attempt.job_dir, job.micro_batch_size, grant, root=sup.layout.root,
                                       state_dir=sup.layout.state, standby=standby, slot=place.slot,
                                       early_only=standby is not None and bool(others))
    except (OSError, RuntimeError) as e:  # its interpreter or the project gone: this attempt fails with why
        write_error(attempt.job_dir, ErrorKind.ERROR, f"the trainer could not be started: {e}")
        end(sup, attempt, protocol.FAILED)
        return
    attempt.trainer = trainer
    if trainer.early_pid is not None:
        sup.status.event("launch", f"job {job.id}: trainer started early (pid {trainer.early_pid})",
                         level="debug", job_id=job.id, pid=trainer.early_pid)
    if trainer.gated:
        if others:
            attempt.current["phase"] = "waiting_for_gpu"  # until its own phase events say more
            ahead = [a for a in others if not a.gated] or others
            sup.status.event("waiting_for_gpu", f"job {job.id}: prepared while job "
                             f"{', '.join(str(a.job.id) for a in ahead)} trains; it trains once the GPU is free"
                             + (f" (after {len(others) - len(ahead)} other prepared job(s))"
                                if len(others) > len(ahead) else ""),
                             job_id=job.id, pid=trainer.early_pid)
        go_if_free(sup)


def go_if_free(sup) -> None:
    """The GPU gate: an early trainer that has its job (prepared, or still preparing) gets the go once no other
    trainer is past its gate (the job before it ended and its GPUs were checked: end() runs the check before
    the loop calls this) and the gate lets a job start (nothing blocks the queue, disk above the floor, the
    devices' trainer locks free). Never during a stop or a pause: those end the waiting trainer instead."""
    gated = [a for a in sup.running.values() if a.gated]
    if not gated or len(gated) < len(sup.running) or sup.signals or control.is_paused(sup.layout):
        return
    attempt = min(gated, key=lambda a: a.job.id)  # handed over in id order: per-adapter order holds
    if attempt.current.get("cancelled"):
        return
    locks = launch.lock_names(launch.Grant(1, attempt.devices), attempt.record.get("slot") or "cpu0")
    if sup.gate.wait_state(attempt.cfg, sup.cfg.limits.min_free_disk_mb, locks=locks) is not None:
        return  # asked again at the next turn (loop.py: _place)
    waited = attempt.current.get("phase") == "waiting_for_gpu"
    attempt.gpu_before = gpu.snapshot(attempt.devices)  # now: the job before it is off the GPU
    try:
        attempt.trainer.go(locks)
    except OSError:
        return  # it died a moment ago: watch() sees its end
    attempt.record["go_at"] = now_iso()
    attempt.job.save(attempt.job_dir)
    sup.status.event("gpu_go", f"job {attempt.job.id}: the GPU is free; its trainer (pid {attempt.trainer.early_pid})"
                     " starts training", level="info" if waited else "debug", job_id=attempt.job.id,
                     pid=attempt.trainer.early_pid, waited=waited)


def _start_on_slurm(sup, attempt: Attempt) -> None:
    from daemon.supervisor import slurm  # only with executor: slurm

    job = attempt.job
    try:
        trainer = slurm.start(job, attempt.job_dir, job.micro_batch_size, attempt.cfg, sup.layout, attempt.record)
    except Exception as e:  # sbatch missing or refusing: this attempt fails with why, the daemon goes on
        job.save(attempt.job_dir)
        write_error(attempt.job_dir, ErrorKind.ERROR, f"the Slurm job could not be submitted: {e}")
        end(sup, attempt, protocol.FAILED)
        return
    job.save(attempt.job_dir)  # the record now names the Slurm job: a restarted daemon re-attaches to it
    attempt.trainer = trainer
    attempt.current["slurm_job_id"] = attempt.record.get("slurm_job_id")
    if attempt.record.get("slurm_job_id"):  # else sbatch refused it: the attempt's end says why
        sup.status.event("launch", f"job {job.id}: submitted as {trainer.describe()}", job_id=job.id,
                         slurm_job_id=attempt.record.get("slurm_job_id"))


def reattach(sup) -> set[int]:
    """After a restart: the Slurm jobs a dead daemon left running become running attempts again; their job
    ids (for the sweep to leave alone). One that cannot be re-attached is left to the sweep."""
    kept: set[int] = set()
    for job, job_dir in sup.spool.list(JobStatus.RUNNING):
        record = job.attempts[-1] if not job.unreadable and job.attempts else {}
        if record.get("executor") != "slurm" or record.get("outcome") or not (
                record.get("slurm_job_id") or record.get("slurm_job_name")):
            continue
        from daemon.supervisor import slurm  # only where a Slurm job was left running

        cfg = sup.config_for(job)
        try:
            trainer = slurm.reattach(job, job_dir, cfg, sup.layout, record)
        except Exception as e:
            sup.status.event("reattach", f"job {job.id}: could not re-attach to its Slurm job: {e}", level="warning",
                             job_id=job.id)
            trainer = None
        if trainer is None:
            continue
        job.save(job_dir)
        attempt = Attempt(job, job_dir, cfg, record, _current(job, record, record.get("slot"), None, "slurm"),
                          executor="slurm", trainer=trainer)
        sup.running[job.id] = attempt
        sup.state = "training"
        sup.status.event("reattached", f"job {job.id}: re-attached to Slurm job "
                         f"{record.get('slurm_job_id') or record.get('slurm_job_name')}", job_id=job.id,
                         slurm_job_id=record.get("slurm_job_id"))
        kept.add(job.id)
    return kept


def watch(sup, attempt: Attempt, timeout: float) -> None:
    """One turn of a job in training: its trainer's new events, then failed ranks and stops, then its end."""
    job, trainer, current = attempt.job, attempt.trainer, attempt.current
    for event in trainer.poll_events(timeout=timeout):
        if event.get("event") == Event.FIRST_STEP:
            attempt.stepped = True
            sup._next_place = 0.0  # this turn: the next early trainer may start now (loop.py: _prestart)
        if event.get("event") == Event.PHASE and event.get("phase") == "saving" and sup.notifier:
            # Saving may take as long as a warm stop may: systemd's watchdog must wait that long too.
            sup.notifier.extend_timeout(int(sup.cfg.limits.stop_timeout_seconds * 1e6))
        try:
            trainer_events.report(event, job, current, sup.status)
        except Exception as e:  # a malformed event must never take the daemon down
            sup.status.event("bad_event", f"job {job.id}: could not handle trainer event {event!r}: {e!r}",
                             level="warning")
        sup.snapshot()
    if trainer.done:
        end(sup, attempt, trainer.exit_status())
        return
    failed = trainer.stop_if_a_rank_failed()
    if failed:
        rank, code = failed
        sup.status.event("rank_failed", f"job {job.id}: rank {rank} exited with "
                         f"{launch.describe_status(code)}; stopping the other ranks", level="warning",
                         job_id=job.id, rank=rank, exit_code=code)
    limits = sup.cfg.limits
    leave = getattr(trainer, "leave_running", None)  # a Slurm job outlives the daemon (slurm_handle.py says when)
    if leave and not current.get("cancelled") and leave(sup.signals, limits.stop_timeout_seconds):
        sup.running.pop(job.id, None)
        sup.status.event("left_running", f"job {job.id}: the daemon stops without ending {trainer.describe()}; it "
                         "stays in running/ and the next start re-attaches to it", level="warning", job_id=job.id)
        return
    if sup.signals >= 2 or current.get("cancelled"):
        trainer.cold_stop()
    elif (sup.signals or control.is_paused(sup.layout)) and trainer.warm_stop():
        what = ("stopping its trainer, which has not had the GPU yet (nothing to checkpoint)" if attempt.gated
                else "asking the trainer to checkpoint and stop")
        sup.status.event("stopping", f"job {job.id}: {what}", job_id=job.id)
    elif trainer.stop_overdue(limits.stop_timeout_seconds):
        sup.status.event("stop_timeout", f"job {job.id}: trainer did not stop in "
                         f"{limits.stop_timeout_seconds}s; killing it", level="warning")
        trainer.cold_stop()
    elif (silent := trainer.stalled(limits.stall_timeout_seconds, limits.start_timeout_seconds)) is not None:
        # Hung (a collective, a driver, a dead mount): killed; the attempt is a failed one, the queue goes on.
        last = trainer_events.describe_event(trainer.last_event)
        attempt.stalled = f"no event from the trainer for {fmt_duration(silent)} (last event: {last})"
        current["phase"] = "stalled"
        sup.status.event("stalled", f"job {job.id} stalled: {attempt.stalled}; killing its trainer",
                         level="warning", job_id=job.id, silent_s=round(silent, 1), last_event=trainer.last_event)
        trainer.cold_stop()


def end(sup, attempt: Attempt, rc: int) -> None:
    """The attempt is over (its trainer exited, or never started): record it, move the job, check its GPUs."""
    sup.running.pop(attempt.job.id, None)
    if attempt.trainer:
        attempt.trainer.close()
    job = attempt.job
    faults.check("job_end", job_id=job.id)
    outcome = describe_exit(rc, attempt.job_dir, stop_requested=sup.signals > 0 or control.is_paused(sup.layout),
                            cancelled=attempt.current.get("cancelled", False), stalled=attempt.stalled)
    cause = None
    if outcome.kind in (OutcomeKind.FAILED, OutcomeKind.STALLED, OutcomeKind.UNAVAILABLE):
        cause = gate.problem(attempt.cfg, sup.layout)
    if cause and outcome.kind != OutcomeKind.UNAVAILABLE:
        # Not the job's fault: what it needed went away under it (the base model mid-load, a GPU off the bus).
        outcome = Outcome(OutcomeKind.UNAVAILABLE, f"{cause} (the attempt failed: {outcome.first_line})")
    attempt.record.update(ended_at=now_iso(), exit_code=rc, outcome=outcome.kind, error=outcome.error)
    if outcome.kind == OutcomeKind.UNAVAILABLE and not cause:
        attempt.record["unconfirmed"] = True  # the trainer saw a cause the daemon's checks do not: bounded
    sup._finish(job, attempt.job_dir, attempt.cfg, outcome)
    if attempt.executor == "slurm":
        sup.status.event("gpu_memory", f"job {job.id}: {NOT_CHECKED_ON_SLURM}", level="debug", job_id=job.id,
                         released=None)
    elif attempt.gated:  # ended before its go: its trainer never had a device
        sup.status.event("gpu_memory", f"job {job.id}: GPU memory not checked: its trainer ended before it was "
                         "given the GPU", level="debug", job_id=job.id, released=None)
    else:
        message, level, fields = gpu.release_report(attempt.gpu_before, attempt.devices)
        sup.status.event("gpu_memory", f"job {job.id}: {message}", level=level, job_id=job.id, **fields)
    sup.state = "training" if sup.running else "idle"
    sup.job_ended()
