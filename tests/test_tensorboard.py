"""status.tensorboard: a job's TensorBoard logs under checkpoints/<adapter>/tensorboard/job-<id>, written through
accelerate's tracker API (daemon/trainer/tracking.py)."""

from __future__ import annotations

import pytest

from helpers import chat_lines, cli, drop, write_config

pytest.importorskip("tensorboard")


@pytest.mark.slow
def test_a_job_writes_its_scalars_for_tensorboard(root, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_config(root, tiny_model_dir, status={"tensorboard": True},
                 training={"eval_fraction": 0.25, "mode": "continue", "packing": False})
    drop(root, "a.jsonl", chat_lines(8, "a"))
    drop(root, "b.jsonl", chat_lines(8, "b"))
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    folder = root / "checkpoints" / "default" / "tensorboard"
    assert sorted(p.name for p in folder.iterdir()) == ["job-1", "job-2"]
    runs = {}
    for job in ("job-1", "job-2"):
        acc = EventAccumulator(str(folder / job))
        acc.Reload()
        runs[job] = acc
    scalars = set(runs["job-2"].Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss",
            "judge/standing_eval_loss", "judge/incumbent_standing_eval_loss"} <= scalars
    losses = runs["job-1"].Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3] and all(e.value > 0 for e in losses)
