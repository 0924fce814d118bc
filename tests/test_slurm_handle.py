"""The Slurm handle (daemon/supervisor/slurm_handle.py) when Slurm is slow, silent or queues the job: what only a
Slurm that stops answering shows, which the real test cluster (tests/test_slurm_executor.py) cannot be made to do
on demand. Slurm's commands are replaced at subprocess.run; everything above it is the daemon's own code."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

from daemon.supervisor import slurm_commands
from daemon.supervisor.slurm_handle import SlurmTrainer


class FakeSlurm:
    """Slurm's commands as slurm_commands runs them: scontrol reports `state`; a command in `hang` times out."""

    def __init__(self, monkeypatch, state="RUNNING"):
        self.state, self.hang, self.calls = state, set(), []
        monkeypatch.setattr(slurm_commands, "_unresponsive_until", 0.0)
        monkeypatch.setattr(slurm_commands.subprocess, "run", self)

    def __call__(self, args, **kw):
        self.calls.append(" ".join(args))
        if args[0] in self.hang:
            raise subprocess.TimeoutExpired(args, kw.get("timeout"))
        out = f"JobId=5 JobName=td-x JobState={self.state} Reason=None Restarts=0\n" if args[0] == "scontrol" else ""
        return subprocess.CompletedProcess(args, 0, out, "")

    def unhang(self, monkeypatch):
        self.hang.clear()
        monkeypatch.setattr(slurm_commands, "_unresponsive_until", 0.0)  # its timeout has passed


def handle(tmp_path, slurm_id="5", tasks=2, record=None):
    cfg = SimpleNamespace(slurm=SimpleNamespace(poll_seconds=0, command_timeout_seconds=1))
    return SlurmTrainer(tmp_path, cfg, slurm_id, "td-x", tasks, record if record is not None else {})


def rank_exit(tmp_path, rank, code):
    (tmp_path / f"slurm-rank{rank}.exit").write_text(json.dumps({"code": code, "rank": rank, "restart_count": 0}))


def test_a_warm_stop_cancels_a_queued_job_even_after_replayed_events_and_retries_what_slurm_did_not_take(
        tmp_path, monkeypatch):
    slurm = FakeSlurm(monkeypatch, state="PENDING")  # e.g. requeued while the daemon was down
    (tmp_path / "events.jsonl").write_text(json.dumps({"event": "first_step", "loss": 1.0}) + "\n")
    h = handle(tmp_path)
    h.poll_events(0)
    assert h.last_event is None  # an earlier run's words: nobody is there to hear a USR1
    slurm.hang.add("scancel")
    assert h.warm_stop()
    assert slurm.calls[-1] == "scancel 5" and not any("USR1" in c for c in slurm.calls)
    slurm.unhang(monkeypatch)
    h.poll_events(0)  # a later look: the cancel Slurm did not take is asked again
    assert slurm.calls[-1] == "scancel 5"
    slurm.state = "CANCELLED"
    assert h.done and h.exit_status() == 75  # withdrawn from Slurm's queue: stopped, nothing lost


def test_a_kill_slurm_did_not_take_is_asked_again_and_slurm_silence_is_shared_by_every_handle(tmp_path,
                                                                                             monkeypatch):
    slurm = FakeSlurm(monkeypatch)
    h, other = handle(tmp_path), handle(tmp_path / "other")
    (tmp_path / "other").mkdir()
    h.poll_events(0)
    slurm.hang.add("scancel")
    h.cold_stop()
    assert not h._killed and not h.stop_overdue(0)  # asked once, not again at every turn
    slurm.hang.add("scontrol")
    before = len(slurm.calls)
    other.poll_events(0)
    assert len(slurm.calls) == before  # a command just timed out: the other job waits for the next turn
    slurm.unhang(monkeypatch)
    h.poll_events(0)
    assert "scancel --signal=KILL 5" in slurm.calls[before:] and h._killed
    rank_exit(tmp_path, 0, -9)
    slurm.state = "CANCELLED"
    assert h.done and h.exit_status() == -9


def test_a_daemon_stop_leaves_a_slurm_job_it_cannot_reach_instead_of_waiting_forever(tmp_path, monkeypatch):
    slurm = FakeSlurm(monkeypatch)
    h = handle(tmp_path)
    h.poll_events(0)
    assert not h.leave_running(0, 5) and not h.leave_running(1, 5)
    assert h.leave_running(2, 5)  # a cold stop of the daemon: the job is left to Slurm, re-attached next start
    slurm.hang.update({"scontrol", "scancel"})
    h.warm_stop()
    h._stop_asked_at -= 10
    h._unanswered_since -= 10
    assert h.leave_running(1, 5)  # Slurm silent for longer than stop_timeout during the stop


def test_missing_ranks_beside_a_warm_stopped_rank_are_collateral_and_a_stop_without_progress_counts(tmp_path,
                                                                                                   monkeypatch):
    FakeSlurm(monkeypatch, state="FAILED")
    rank_exit(tmp_path, 0, 75)  # rank 1 was ended by srun once rank 0 exited 75
    h = handle(tmp_path, record={"slurm_stop_signalled": True})
    assert h.done and h.exit_status() == 75
    # The same end nobody asked for (a time limit), with no checkpoint newer than the attempt's start.
    h = handle(tmp_path, record={"slurm_resume_from": None})
    assert h.done and h.exit_status() == 1
    assert "before a checkpoint newer than none" in json.loads((tmp_path / "error.json").read_text())["message"]
    ckpt = tmp_path / "resume" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    assert handle(tmp_path, record={"slurm_resume_from": None}).exit_status() == 75  # it progressed: resumed
