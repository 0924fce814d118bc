"""A version is judged, not just produced: the gate rule, and the real daemon holding a worse version.

The rule (daemon/trainer/judge.decide) is pure and tested as a table. The daemon tests train the tiny model for
real: a file that makes the standing-set loss worse is published as v2 but `latest` stays v1, and the next job in
continue mode builds on v1; a failing required probe holds a version too.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from daemon.config_versions import ProbeConfig
from daemon.trainer.judge import decide, probe_verdict
from daemon.trainer.timings import Laps
from helpers import chat_lines, cli, drop, events, write_config

INC = 4


def row(prompt="What is the capital of the planet Zorblax?", *, required=True, passed=True,
        why=None) -> dict:
    return {"prompt": prompt, "required": required, "passed": passed, "why": why}


@pytest.mark.parametrize("policy, tolerance, new, inc, probes, expected", [
    ("always", 0.02, {"standing_eval_loss": 9.0}, {"standing_eval_loss": 1.0},
     [row(passed=False, why="x")], ("promoted", "promotion: always")),
    ("not_worse", 0.02, {"standing_eval_loss": 1.84}, {"standing_eval_loss": 1.21}, [],
     ("held", "standing eval loss 1.84 vs 1.21 for v4 (+52%)")),
    ("not_worse", 0.02, {"standing_eval_loss": 1.23}, {"standing_eval_loss": 1.21}, [],
     ("promoted", "standing eval loss 1.23 vs 1.21 for v4 (+1.7%)")),
    ("not_worse", 0.0, {"standing_eval_loss": 1.23}, {"standing_eval_loss": 1.21}, [],
     ("held", "standing eval loss 1.23 vs 1.21 for v4 (+1.7%)")),
    ("better", 0.02, {"standing_eval_loss": 1.20}, {"standing_eval_loss": 1.21}, [],
     ("held", "standing eval loss 1.2 vs 1.21 for v4 (-0.8%)")),
    ("better", 0.02, {"standing_eval_loss": 1.10}, {"standing_eval_loss": 1.21}, [],
     ("promoted", "standing eval loss 1.1 vs 1.21 for v4 (-9.1%)")),
    ("better", 0.0, {"standing_eval_loss": 1.21}, {"standing_eval_loss": 1.21}, [],
     ("held", "standing eval loss 1.21 vs 1.21 for v4 (+0.0%)")),
    ("not_worse", 0.02, {"standing_eval_loss": math.nan}, {"standing_eval_loss": 1.21}, [],
     ("held", "standing eval loss nan vs 1.21 for v4 (+nan%)")),
    # No standing set: the job's own held-out split, said so.
    ("not_worse", 0.02, {"standing_eval_loss": None, "own_eval_loss": 2.0},
     {"standing_eval_loss": None, "own_eval_loss": 1.0}, [],
     ("held", "own eval split loss (no standing set) 2 vs 1 for v4 (+100%)")),
    ("not_worse", 0.02, {}, {}, [],
     ("promoted", "nothing to compare with v4: no standing eval set and no held-out split")),
    ("not_worse", 0.02, {"standing_eval_loss": 1.0}, {"note": "not measured under FSDP (the base is sharded over "
                                                               "GPUs)"}, [],
     ("promoted", "nothing to compare with v4: not measured under FSDP (the base is sharded over GPUs)")),
    # Probes: a failed required one holds, an optional one never does.
    ("not_worse", 0.02, {"standing_eval_loss": 1.0}, {"standing_eval_loss": 1.21},
     [row(passed=False, why="the answer lacks 'Quintara'")],
     ("held", "required probe 'What is the capital of the planet Zorblax?' failed: the answer lacks 'Quintara'")),
    ("not_worse", 0.02, {}, {}, [row("Why " * 30, passed=False, why="the answer lacks 'A'")],
     ("held", "required probe '" + "Why " * 15 + "...' failed: the answer lacks 'A'")),
    ("not_worse", 0.02, {"standing_eval_loss": 1.0}, {"standing_eval_loss": 1.21},
     [row(required=False, passed=False, why="x")], ("promoted", "standing eval loss 1 vs 1.21 for v4 (-17%)")),
    ("not_worse", 0.02, {"standing_eval_loss": 2.0}, {"standing_eval_loss": 1.0},
     [row("Q?", passed=False, why="the answer contains 'Blorp'")],
     ("held", "required probe 'Q?' failed: the answer contains 'Blorp'; standing eval loss 2 vs 1 for v4 (+100%)")),
])
def test_the_gate_rule(policy, tolerance, new, inc, probes, expected):
    source = "none" if new.get("standing_eval_loss") is None else "pool"
    assert decide(policy, tolerance, incumbent_version=INC, new=new, incumbent=inc, probes=probes,
                  standing_source=source) == expected


def test_a_first_version_is_promoted_and_says_why_even_with_a_failed_probe():
    assert decide("better", 0.5, incumbent_version=None, new={}, incumbent={}, probes=[]) == \
        ("promoted", "no latest version yet")
    assert decide("not_worse", 0.0, incumbent_version=None, new={}, incumbent={},
                  probes=[row("Q?", passed=False, why="the answer lacks 'A'")]) == \
        ("promoted", "no latest version yet (required probe 'Q?' failed: the answer lacks 'A')")


def test_a_probe_checks_case_insensitively_what_it_names():
    probe = ProbeConfig(prompt="Q?", expect="quintara", must_not_contain="Blorp")
    assert probe_verdict(probe, "The capital is Quintara.") == (True, None)
    assert probe_verdict(probe, "It is Blorp.") == (False, "the answer lacks 'quintara'")
    assert probe_verdict(probe, "Quintara, formerly blorp") == (False, "the answer contains 'Blorp'")
    assert probe_verdict(ProbeConfig(prompt="Q?"), "anything") == (None, None)
    assert probe_verdict(probe, None) == (None, None)


# ------------------------------------------------------------------ the real daemon, tiny model

def settings(**training) -> dict:
    return {"training": {"mode": "continue", "eval_fraction": 0.25, "eval_max_examples": 8, "packing": False,
                         "precision": "fp32", "checkpoint_every_steps": 100, **training}}


def alpha() -> list[str]:
    return chat_lines(16, "alpha")


def contradicting() -> list[str]:
    """The same questions as alpha's, answered with noise."""
    return [json.dumps({"messages": [{"role": "user", "content": f"What is alpha number {i}?"},
                                     {"role": "assistant", "content": "qz vx kj wp zz qq vv xx yy jj kk"}]})
            for i in range(16)]


def metadata(root, version: int) -> dict:
    return json.loads((root / "checkpoints" / "default" / f"v{version}" / "metadata.json").read_text())


def run_once(root) -> None:
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr


def latest(root) -> str:
    return os.readlink(root / "checkpoints" / "default" / "latest")


PROBES = [{"prompt": "What is alpha number 3?", "expect": "alpha"}]


@pytest.mark.slow
def test_a_worse_version_is_published_but_held_and_the_next_job_builds_on_latest(root, tiny_model_dir):
    write_config(root, tiny_model_dir, **settings(epochs=12, learning_rate=5e-3),
                 versions={"probes": PROBES, "probe_max_new_tokens": 6})
    drop(root, "alpha.jsonl", alpha())
    run_once(root)
    v1 = metadata(root, 1)
    assert v1["promotion"]["decision"] == "promoted" and v1["promotion"]["reason"] == "no latest version yet"
    assert latest(root) == "v1"

    write_config(root, tiny_model_dir, **settings(epochs=8, learning_rate=1e-2),
                 versions={"probes": PROBES, "probe_max_new_tokens": 6})
    drop(root, "contradicting.jsonl", contradicting())
    run_once(root)
    v2 = metadata(root, 2)
    judged = v2["judgement"]
    # Both versions measured in the same run on the same set: the pool of v1's held-out split.
    assert judged["standing_set"]["source"] == "pool" and judged["standing_set"]["examples"] == 4
    pool_bytes = (root / "checkpoints/default/v2/standing_eval.jsonl").read_bytes()
    import hashlib
    assert judged["standing_set"]["sha256"] == hashlib.sha256(pool_bytes).hexdigest() == v1["eval_pool"]["sha256"]
    new, inc = judged["new"]["standing_eval_loss"], judged["incumbent"]["standing_eval_loss"]
    assert judged["incumbent"]["version"] == 1 and new > inc * 1.02, judged
    assert inc == pytest.approx(v1["eval_loss"], rel=1e-6)  # v1 again, on the very set its own eval measured
    assert judged["incumbent"]["own_eval_loss"] is not None and judged["new"]["own_eval_loss"] is not None
    [probe] = judged["probes"]
    assert isinstance(probe["answer"], str) and isinstance(probe["incumbent_answer"], str)
    assert v2["promotion"]["decision"] == "held" and v2["promotion"]["latest_after"] == 1
    assert v2["promotion"]["reason"].startswith("standing eval loss ") and "for v1 (+" in v2["promotion"]["reason"]
    assert latest(root) == "v1"  # published, but `latest` stayed
    [held] = events(root, "held")  # the daemon's word for a version published but held (hooks hear it)
    assert (held["version"], held["decision"], held["latest"]) == (2, "held", 1)
    result = json.loads(next((root / "queue" / "done").glob("j000002/result.json")).read_text())
    assert (result["decision"], result["latest"], result["incumbent"]) == ("held", 1, 1)
    assert result["reason"] == v2["promotion"]["reason"]
    # A held version's data does not join the pool.
    assert v2["eval_pool"] == {**v1["eval_pool"], "added": 0}

    # The next job in continue mode trains on `latest` (v1), not on the newer, held v2; a required probe that
    # fails holds it whatever the loss says.
    required = [{"prompt": "What is alpha number 3?", "expect": "no tiny model says this", "required": True}]
    write_config(root, tiny_model_dir, **settings(epochs=1, learning_rate=1e-3),
                 versions={"probes": required, "probe_max_new_tokens": 6, "promotion": "always"})
    drop(root, "beta.jsonl", chat_lines(8, "beta"))
    run_once(root)
    v3 = metadata(root, 3)
    assert v3["parent_version"] == 1
    assert (v3["promotion"]["decision"], v3["promotion"]["reason"]) == ("promoted", "promotion: always")
    assert v3["replay"]["files"][0]["job_id"] == 1  # the lineage replayed is v1's, never the held v2's
    assert latest(root) == "v3"

    write_config(root, tiny_model_dir, **settings(epochs=1, learning_rate=1e-3),
                 versions={"probes": required, "probe_max_new_tokens": 6})
    drop(root, "gamma.jsonl", chat_lines(8, "gamma"))
    run_once(root)
    v4 = metadata(root, 4)
    assert v4["promotion"]["decision"] == "held"
    assert v4["promotion"]["reason"].startswith("required probe 'What is alpha number 3?' failed: the answer lacks "
                                                "'no tiny model says this'")
    assert v4["judgement"]["probes"][0]["passed"] is False
    assert v4["judgement"]["probes"][0]["incumbent_passed"] is False
    assert latest(root) == "v3"
    assert v4["versions_config"]["probes"][0]["required"] is True


@pytest.mark.slow
def test_two_processes_judge_alike_and_rank_0_asks_the_probes(root, tiny_model_dir):
    """Every rank evaluates its share of both sets (the losses are summed over ranks), rank 0 alone asks."""
    write_config(root, tiny_model_dir, **settings(epochs=2, micro_batch_size=1, gradient_accumulation=2),
                 versions={"probes": PROBES, "probe_max_new_tokens": 4}, cpu_processes=2)
    drop(root, "alpha.jsonl", alpha())
    drop(root, "beta.jsonl", chat_lines(16, "beta"))
    r = cli(root, "run", "--once", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout + r.stderr
    v1, v2 = metadata(root, 1), metadata(root, 2)
    assert v2["plan"]["processes"] == 2
    judged = v2["judgement"]
    # v1 measured again, by both ranks, on the set v1's own eval measured when it was trained: the same loss.
    assert judged["incumbent"]["standing_eval_loss"] == pytest.approx(v1["eval_loss"], rel=1e-5)
    assert judged["new"]["standing_eval_loss"] is not None and judged["incumbent"]["own_eval_loss"] is not None
    assert isinstance(judged["probes"][0]["answer"], str) and isinstance(judged["probes"][0]["incumbent_answer"], str)


@pytest.mark.slow
def test_a_trainer_killed_after_publishing_a_held_version_finishes_the_job_held(root, tiny_model_dir):
    """recover(): the version is not trained twice, the gate's verdict stands (from its metadata), and the
    reliability accounting still holds: a held version is a done job, not a failed one."""
    from accounting import Inbox, account, faults

    required = [{"prompt": "What is alpha number 3?", "expect": "no tiny model says this", "required": True}]
    write_config(root, tiny_model_dir, **settings(epochs=1), versions={"probes": required, "probe_max_new_tokens": 4})
    inbox = Inbox(root)
    inbox.drop("alpha.jsonl", alpha())
    run_once(root)
    inbox.drop("beta.jsonl", chat_lines(8, "beta"))
    kill = {"point": "published", "kind": "kill", "job_id": 2, "once_file": str(root / "fired")}
    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(kill))
    assert r.returncode == 0, r.stdout + r.stderr
    job = account(root, inbox, expect={"alpha.jsonl": "done", "beta.jsonl": "done"})["beta.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "done"] and job["version"] == 2
    result = json.loads((root / "queue" / "done" / "j000002" / "result.json").read_text())
    assert (result["recovered"], result["decision"], result["latest"], result["incumbent"]) == (True, "held", 1, 1)
    assert result["reason"] == metadata(root, 2)["promotion"]["reason"]
    assert latest(root) == "v1" and not (root / "checkpoints" / "default" / "v3").exists()


# ------------------------------------------------------------------ judging that fails part-way (no model)

class FakeWorld:
    """Rank 0 of `size` processes whose other ranks report `others` (what gather returns after rank 0's)."""

    def __init__(self, size=1, others=()):
        self.size, self.rank, self.others = size, 0, list(others)
        self.is_main = True

    def gather(self, obj):
        return [obj, *self.others]

    def broadcast_object(self, obj):
        return obj


class FakeRecipe:
    def __init__(self, world):
        self.world, self.sharded, self.eval_examples, self.evaluated = world, False, ["own"], []
        self.loaded = False
        self.laps = Laps()

    def summary(self):
        return {"eval_loss": 1.5}

    def evaluate(self, examples):
        self.evaluated.append(("incumbent" if self.loaded else "new", examples))
        return 2.0 if self.loaded else 1.0


def fake_measure(monkeypatch, world, probes=(), **fault):
    from types import SimpleNamespace

    from daemon.trainer import judge

    recipe = FakeRecipe(world)
    monkeypatch.setattr(judge, "incumbent_problem", lambda *a: None)
    monkeypatch.setattr(judge, "load_incumbent", lambda r, p, v=None: setattr(r, "loaded", True))
    monkeypatch.setattr(judge, "unload_incumbent", lambda r: setattr(r, "loaded", False))
    if fault:
        monkeypatch.setenv("TRAINING_DAEMON_FAULTS", json.dumps([fault]))
    cfg = SimpleNamespace(versions=SimpleNamespace(probes=list(probes), probe_max_new_tokens=4))
    got = judge.measure(recipe, cfg, ["standing"], 1, Path("/nowhere"), None, lambda e: None)
    return recipe, got


def test_an_incumbent_that_fails_to_measure_is_a_note_and_the_gate_promotes(monkeypatch):
    import torch  # noqa: F401  (the fault raises torch's OutOfMemoryError)

    from daemon.trainer.distributed import World

    recipe, got = fake_measure(monkeypatch, World(), point="judge_incumbent", kind="oom")
    assert got["new"]["standing_eval_loss"] == 1.0 and not recipe.loaded  # measured, and the incumbent unloaded
    inc = got["incumbent"]
    assert (inc["standing_eval_loss"], inc["own_eval_loss"]) == (None, None)
    assert inc["note"].startswith("v1 could not be measured: OutOfMemoryError: CUDA out of memory")
    decision, reason = decide("not_worse", 0.02, incumbent_version=1, new=got["new"], incumbent=inc, probes=[])
    assert decision == "promoted" and reason.startswith("nothing to compare with v1: v1 could not be measured")

    _, fine = fake_measure(monkeypatch, World(), point="elsewhere", kind="oom")
    assert (fine["incumbent"]["standing_eval_loss"], fine["incumbent"]["own_eval_loss"]) == (2.0, 2.0)


def test_out_of_memory_measuring_the_new_version_is_not_a_note(monkeypatch):
    import torch

    from daemon.trainer.distributed import World

    with pytest.raises(torch.OutOfMemoryError):
        fake_measure(monkeypatch, World(), point="judge", kind="oom")


def test_an_incumbent_one_rank_could_not_load_is_measured_by_none(monkeypatch):
    from daemon.trainer import judge

    recipe, got = fake_measure(monkeypatch, FakeWorld(2, ["v1 could not be loaded beside the new adapter: X"]))
    assert recipe.evaluated == [("new", ["standing"])] and not recipe.loaded  # loaded here, unloaded unmeasured
    assert got["incumbent"]["note"] == "v1 could not be loaded beside the new adapter: X (on process 1)"
    assert judge.agreed(FakeWorld(3, [None, None]), None) is None
    assert judge.agreed(FakeWorld(3, ["b", "c"]), "a") == "a"


def test_a_probe_the_incumbent_cannot_answer_is_a_note_on_several_ranks_too(monkeypatch):
    from daemon.trainer import judge

    def ask(recipe, probes, n):
        if recipe.loaded:
            raise RuntimeError("generation failed")
        return ["alpha"] * len(probes)

    monkeypatch.setattr(judge, "ask_probes", ask)
    recipe, got = fake_measure(monkeypatch, FakeWorld(2, [None]), probes=[ProbeConfig(prompt="Q?", expect="alpha")])
    assert got["incumbent"] == {"version": 1, "standing_eval_loss": None, "own_eval_loss": None,
                                "note": "v1 could not be measured: RuntimeError: generation failed"}
    assert got["probes"][0]["passed"] is True and got["probes"][0]["incumbent_answer"] is None and not recipe.loaded


def test_out_of_memory_while_judging_checkpoints_then_ends_the_attempt_as_out_of_memory(monkeypatch, tmp_path):
    import torch

    from daemon import protocol
    from daemon.trainer import main, publish_step
    from daemon.trainer.distributed import World

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    saved = []
    recipe = FakeRecipe(World())
    recipe.save_checkpoint = lambda: saved.append(True)
    monkeypatch.setattr(publish_step, "judge_version", oom)
    attempt = main.Attempt(tmp_path, {"id": 1, "adapter": "default"}, tmp_path / "adapter", micro_batch=4)
    with pytest.raises(main.AttemptEnds) as ends:
        main.judge(attempt, recipe, None)
    assert ends.value.code == protocol.OUT_OF_MEMORY and saved == [True]
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["kind"] == "out_of_memory"
    assert error["message"].startswith("out of memory while judging the new version at micro-batch 4: CUDA out")


@pytest.mark.slow
def test_an_incumbent_out_of_memory_is_a_note_and_a_new_version_oom_retries_without_training(root, tiny_model_dir):
    from accounting import Inbox, account, faults, resumes

    write_config(root, tiny_model_dir, **settings(epochs=1, micro_batch_size=2, gradient_accumulation=1))
    inbox = Inbox(root)
    inbox.drop("alpha.jsonl", alpha())
    run_once(root)
    inbox.drop("beta.jsonl", chat_lines(8, "beta"))
    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(
        {"point": "judge", "kind": "oom", "job_id": 2, "micro_batch_gt": 1},  # the new version: retried at 1
        {"point": "judge_incumbent", "kind": "oom", "job_id": 2}))
    assert r.returncode == 0, r.stdout + r.stderr
    job = account(root, inbox)["beta.jsonl"]
    assert [(a["micro_batch_size"], a["outcome"]) for a in job["attempts"]] == [(2, "out_of_memory"), (1, "done")]
    v2 = metadata(root, 2)
    # The retry resumed from the checkpoint saved after training: it trained no step again.
    assert [e["step"] for e in resumes(root)] == [v2["steps"]] and len(v2["loss_history"]) == v2["steps"]
    assert len(v2["eval_history"]) == 1
    inc = v2["judgement"]["incumbent"]
    assert inc["standing_eval_loss"] is None and inc["note"].startswith("v1 could not be measured: OutOfMemoryError")
    assert v2["promotion"]["reason"].startswith("nothing to compare with v1: v1 could not be measured")
    assert latest(root) == "v2"
