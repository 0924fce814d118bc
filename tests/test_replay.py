"""Replay against forgetting: in continue mode, examples of the adapter's earlier files train along.

The real daemon and the tiny model: the replayed files and counts are in metadata.json, a run killed mid-way
and resumed publishes bit-for-bit the adapter of an uninterrupted one (CPU, fp32) with replay on, and a done
file deleted by hand is a note, never a failure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accounting import Inbox, account, faults, resumes, trainer_pids, wait_event
from daemon.trainer import checkpoint
from helpers import chat_lines, cli, jobs, start_daemon, wait_for, write_config

FIRST = chat_lines(8, "first")
SECOND = chat_lines(16, "second")
SETTINGS = {"mode": "continue", "packing": False, "micro_batch_size": 2, "gradient_accumulation": 1,
            "checkpoint_every_steps": 2, "keep_checkpoints": 2, "precision": "fp32", "seed": 7,
            "eval_fraction": 0.25, "eval_max_examples": 2}


def configure(root: Path, model_dir: Path, fraction: float = 0.2) -> None:
    write_config(root, model_dir, training=SETTINGS, versions={"replay_fraction": fraction})


def run(root: Path, **env) -> None:
    r = cli(root, "run", "--once", **env)
    assert r.returncode == 0, r.stdout + r.stderr


def metadata(root: Path, version: int) -> dict:
    return json.loads((root / "checkpoints" / "default" / f"v{version}" / "metadata.json").read_text())


def adapter(root: Path, version: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors"))


def two_jobs(root: Path, model_dir: Path, **env) -> Inbox:
    configure(root, model_dir)
    inbox = Inbox(root)
    inbox.drop("first.jsonl", FIRST)
    run(root)
    inbox.drop("second.jsonl", SECOND)
    run(root, **env)
    return inbox


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    """two_jobs() without a fault, once for the module: the reference the killed run must match (read-only), and
    the lineage a deleted done file is taken out of (from a copy)."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    two_jobs(reference, tiny_model_dir)
    return reference


@pytest.mark.slow
def test_replay_is_recorded_and_a_killed_run_resumes_to_the_same_adapter(root, tiny_model_dir, uninterrupted):
    reference = uninterrupted

    kill = {"point": "train_step", "kind": "kill", "step": 3, "once_file": str(root / "fired")}
    inbox = two_jobs(root, tiny_model_dir, TRAINING_DAEMON_FAULTS=faults(kill))
    job = account(root, inbox)["second.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "done"]
    assert [(e["checkpoint"], e["step"]) for e in resumes(root)] == [("step-000002", 2)]

    v2 = metadata(root, 2)
    # 14 new training examples (16 less the 2 held out), and round(0.2 / 0.8 * 14) = 4 replayed from
    # first.jsonl's 6 training examples (its 2 held-out ones, the eval pool's, never).
    assert v2["examples_trained"] == 14 + 4
    assert v2["replay"] == {"fraction": 0.2, "examples": 4, "notes": [],
                            "files": [{"job_id": 1, "source_file": "first.jsonl", "examples": 4,
                                       "sha256": metadata(root, 1)["source_sha256"]}]}
    assert v2["replay"] == metadata(reference, 2)["replay"]
    expected, got = adapter(reference, 2), adapter(root, 2)
    assert got.keys() == expected.keys()
    assert not [n for n in expected if not torch.equal(got[n], expected[n])], "the resumed adapter differs"


@pytest.mark.slow
def test_a_deleted_done_file_is_a_note_and_the_rest_of_the_lineage_is_replayed(root, uninterrupted):
    shutil.copytree(uninterrupted, root, symlinks=True, dirs_exist_ok=True)  # two_jobs(), trained once for the module
    (root / "queue" / "done" / "j000001" / "input.jsonl").unlink()
    Inbox(root).drop("third.jsonl", chat_lines(8, "third"))
    run(root)
    v3 = metadata(root, 3)
    assert v3["parent_version"] == 2
    assert v3["replay"]["notes"] == ["job 1's file (first.jsonl, v1) is no longer in queue/done: not replayed"]
    assert [(f["job_id"], f["source_file"]) for f in v3["replay"]["files"]] == [(2, "second.jsonl")]
    assert v3["replay"]["examples"] == round(0.2 / 0.8 * 6) == 2
    assert "replay: job 1's file (first.jsonl, v1) is no longer in queue/done" in (root / "status.log").read_text()


@pytest.mark.slow
def test_a_lineage_file_gone_between_attempts_restarts_the_job_from_step_0(root, tiny_model_dir):
    """The resumed checkpoint trained on first.jsonl's replayed examples; without them the same progress would
    index another plan: the job starts over, says why, and publishes."""
    configure(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("first.jsonl", FIRST)
    run(root)
    inbox.drop("second.jsonl", SECOND)
    stuck = {"point": "train_step", "kind": "hang", "step": 3, "job_id": 2}
    daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=faults(stuck))
    try:
        wait_event(root, "checkpoint", step=2, job_id=2)
        (trainer,) = trainer_pids(root)
    finally:
        daemon.kill()
        daemon.wait()
    wait_for(lambda: trainer not in trainer_pids(root), timeout=10, what="the orphaned trainer to exit")
    first_input = root / "queue" / "done" / "j000001" / "input.jsonl"
    first_bytes = first_input.read_bytes()
    first_input.unlink()
    run(root)

    assert [j["folder"] for j in jobs(root) if j["id"] == 2] == ["done"]
    assert resumes(root) == []  # not resumed: started over
    log = (root / "status.log").read_text()
    assert "not resuming from checkpoint step-000002: it trained on other examples" in log
    v2 = metadata(root, 2)
    assert v2["replay"]["examples"] == 0
    assert v2["replay"]["notes"] == ["job 1's file (first.jsonl, v1) is no longer in queue/done: not replayed"]
    assert v2["examples_trained"] == 14
    first_input.write_bytes(first_bytes)  # deleted on purpose above; the accounting checks every job's bytes
    account(root, inbox)


class Example:
    def __init__(self, *ids: int):
        self.input_ids = list(ids)


def test_the_examples_fingerprint_sees_order_and_boundaries():
    fp = checkpoint.examples_fingerprint
    assert fp([Example(1, 2), Example(3)]) == fp([Example(1, 2), Example(3)])
    assert len({fp([Example(1, 2), Example(3)]), fp([Example(3), Example(1, 2)]), fp([Example(1), Example(2, 3)]),
                fp([Example(1, 2)])}) == 4


def fake_checkpoint(resume: Path, step: int, fingerprint: str | None) -> Path:
    import hashlib

    path = resume / f"step-{step:06d}"
    path.mkdir(parents=True)
    progress = {"step": step, **({"examples_sha256": fingerprint} if fingerprint else {})}
    (path / "progress.json").write_text(json.dumps(progress))
    digest = hashlib.sha256((path / "progress.json").read_bytes()).hexdigest()
    (path / "COMPLETE").write_text(json.dumps({"step": step, "files": {"progress.json": digest}}))
    return path


def test_a_checkpoint_of_other_examples_is_not_resumed_and_is_dropped(tmp_path):
    logged: list[str] = []
    fake_checkpoint(tmp_path / "a", 2, "aaa")
    newest = fake_checkpoint(tmp_path / "a", 4, "aaa")
    assert checkpoint.resumable(tmp_path / "a", "aaa", log=logged.append) == newest and logged == []
    assert checkpoint.resumable(tmp_path / "a", "bbb", log=logged.append) is None
    assert logged == ["not resuming from checkpoint step-000004: it trained on other examples (a replayed file "
                      "gone or changed since): starting the job from step 0"]
    assert checkpoint.complete_checkpoints(tmp_path / "a") == []  # a later save must not lose to them
    old = fake_checkpoint(tmp_path / "b", 2, None)  # from before fingerprints: trusted
    assert checkpoint.resumable(tmp_path / "b", "bbb", log=logged.append) == old
