"""`executor: slurm`: each attempt of a job is one Slurm batch job, submitted (start) or found again after a daemon
restart (reattach) here; slurm_handle.SlurmTrainer is the daemon's handle on it (the same shape as
trainer_process.TrainerProcess: daemon/supervisor/executor.py's TrainerHandle), slurm_exit.py reads how it ended.

The Slurm job outlives the daemon by design: there is no lifeline, rank 0's events go to <job_dir>/events.jsonl,
each rank leaves its exit status in <job_dir>/slurm-rank<r>.exit, and a restarted daemon re-attaches (reattach)
by the job id, or by the job name recorded before sbatch ran. Slurm's commands (sbatch, scontrol, scancel) are run
directly, each with a timeout (slurm_commands.py); the batch script is slurm_script.py's. No torch here.
"""

from __future__ import annotations

from pathlib import Path

from daemon import durable, faults
from daemon.paths import Layout
from daemon.supervisor import slurm_commands, slurm_script
from daemon.supervisor.outcome import resume_point
from daemon.supervisor.slurm_commands import GONE, SlurmUnavailable, problem, run  # noqa: F401 - problem: gate.py
from daemon.supervisor.slurm_handle import ENDED, EVENTS_FILE, QUEUED, SlurmTrainer  # noqa: F401 - the API


# ---------------------------------------------------------------------------- submit and re-attach

def start(job, job_dir: Path, micro_batch: int | None, cfg, layout: Layout, record: dict) -> SlurmTrainer:
    """Submit this attempt of `job` (record: its entry in job.attempts). The job name is saved in job.json before
    sbatch runs, so a daemon that dies in between finds the job by name. A refused or impossible submission
    is an attempt that ended UNAVAILABLE, with sbatch's own words in error.json: the queue waits, nothing is lost.

    Exactly one Slurm job per daemon job: an earlier attempt's job that still lives (its sbatch answer was lost,
    or the daemon could not record it) is cancelled first, and an sbatch that timed out or failed is checked
    against Slurm's own list (by the attempt's name) before it is called refused: Slurm may have taken it."""
    name = slurm_script.job_name(layout.root, job.id, record["n"])
    tasks = slurm_script.world_size(cfg)
    timeout = cfg.slurm.command_timeout_seconds
    record.update(executor="slurm", slurm_job_name=name, slurm_tasks=tasks,
                  slurm_resume_from=resume_point(job_dir))  # slurm_exit.py: did a time-limit stop progress?
    record.pop("slurm_job_id", None)
    record.pop("events_offset", None)
    job.save(job_dir)
    notes: list[str] = []
    earlier = _cancel_earlier(layout, job.id, record["n"], timeout, notes)
    if earlier is not None:
        return SlurmTrainer.refused(job_dir, cfg, name, earlier, notes)
    # This attempt's files only: the previous attempt's statuses and events must not speak for it.
    for old in job_dir.glob("slurm-rank*.exit"):
        old.unlink(missing_ok=True)
    (job_dir / EVENTS_FILE).unlink(missing_ok=True)
    script = job_dir / slurm_script.BATCH_SCRIPT
    durable.write_text(script, slurm_script.batch_script(cfg, job_dir, layout.root, name, micro_batch))
    failure = answer = None
    try:
        r = run(["sbatch", "--parsable", str(script)], timeout)
        if faults.active("sbatch", kind="timeout"):  # the test hook: Slurm took the job, its answer was lost
            raise SlurmUnavailable(f"sbatch did not answer in {timeout:.0f}s (injected fault at sbatch)")
        if r.returncode != 0 or not r.stdout.strip():
            failure = f"sbatch refused: {r.stderr.strip() or r.stdout.strip() or f'status {r.returncode}'}"
        answer = r.stdout.strip()
    except SlurmUnavailable as e:
        failure = f"sbatch could not be run: {e}"
    if failure is not None:
        found = slurm_commands.jobs_named([name], timeout)
        if not found:
            return SlurmTrainer.refused(job_dir, cfg, name, failure, notes)
        answer = found[-1][0]
        notes.append(f"{failure}; but Slurm has job {answer} under this attempt's name {name}: watching it")
    slurm_id, _, cluster = answer.partition(";")  # --parsable: "id" or "id;cluster"
    if cluster:
        # Every later scontrol/scancel would need -M: a job the daemon cannot watch must not run unwatched.
        try:
            run(["scancel", "-M", cluster, slurm_id], timeout)
        except SlurmUnavailable:
            pass
        return SlurmTrainer.refused(job_dir, cfg, name, f"sbatch answered {answer}: a job on cluster {cluster} "
                                    "(--clusters, or a federation) cannot be watched by the daemon; it was cancelled",
                                    notes)
    record["slurm_job_id"] = slurm_id
    job.save(job_dir)
    handle = SlurmTrainer(job_dir, cfg, slurm_id, name, tasks, record, lambda: job.save(job_dir))
    for note in notes:
        handle._note(note)
    return handle


def _cancel_earlier(layout: Layout, job_id: int, n: int, timeout: float, notes: list[str]) -> str | None:
    """Cancel every Slurm job of attempts 1..n-1 of this job that still lives (found by name), so an orphan never
    trains next to its successor in the same job folder. Why the submission must wait, or None."""
    if n <= 1:
        return None
    names = [slurm_script.job_name(layout.root, job_id, k) for k in range(1, n)]
    found = slurm_commands.jobs_named(names, timeout)
    if found is None:
        return "Slurm did not answer when asked for this job's earlier Slurm jobs (squeue -n); not submitted"
    for slurm_id, state in found:
        if state in ENDED:
            continue
        try:
            killed = (run(["scancel", "--signal=KILL", slurm_id], timeout).returncode == 0
                      and run(["scancel", slurm_id], timeout).returncode == 0)
        except SlurmUnavailable:
            killed = False
        if not killed:
            return f"Slurm job {slurm_id} of an earlier attempt still lives ({state}) and scancel failed; not submitted"
        notes.append(f"cancelled Slurm job {slurm_id} ({state}) of an earlier attempt of this job: only one may train")
    return None


def reattach(job, job_dir: Path, cfg, layout: Layout, record: dict) -> SlurmTrainer | None:
    """The handle on an attempt a dead daemon left running: by its recorded id, else by its name (the daemon
    died between sbatch and saving the id), else by the id its ranks wrote. None when Slurm says it knows no
    such job and no rank left a status: then nothing runs and the start-up sweep requeues the job as for a
    local one. When Slurm does not answer, the handle looks the name up again at its polls (never None: the
    job may be training). Events already reported (up to record["events_offset"]) are not read again."""
    name = record.get("slurm_job_name") or slurm_script.job_name(layout.root, job.id, record["n"])
    tasks = record.get("slurm_tasks") or slurm_script.world_size(cfg)
    slurm_id = record.get("slurm_job_id")

    def save():
        job.save(job_dir)

    if slurm_id is None:
        found = slurm_commands.jobs_named([name], cfg.slurm.command_timeout_seconds)
        if found is None:
            handle = SlurmTrainer.looking_up(job_dir, cfg, name, tasks, record, save)
            handle._note(f"Slurm did not answer when asked for the job named {name}; asking again at each poll")
            return handle
        if found:
            slurm_id = found[-1][0]
        else:
            written = slurm_commands.rank_statuses(job_dir).values()
            slurm_id = next((s["slurm_job_id"] for s in written if s.get("slurm_job_id")), None)
        if slurm_id is None:
            return None
        record["slurm_job_id"] = str(slurm_id)
        job.save(job_dir)
    handle = SlurmTrainer(job_dir, cfg, str(slurm_id), name, tasks, record, save)
    handle._refresh(force=True)
    if handle.slurm_state == GONE and not slurm_commands.rank_statuses(job_dir):
        return None
    return handle
