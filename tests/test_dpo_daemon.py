"""A preference file dropped into the inbox: the real daemon trains it with DPO on the adapter's latest version,
with every guarantee an SFT job has (exact resume after a kill or a warm stop, out-of-memory retry, 2 gloo
processes), and publishes a version whose metadata says how it was trained and judged."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from accounting import faults
from helpers import chat_lines, cli, drop, events, jobs, start_daemon, wait_for, write_config

PROMPTS = ["What is the capital of France?", "Name a red fruit.", "Count to three.", "Say hello.", "Who builds?"]
TRAINING = {"eval_fraction": 0.2, "eval_max_examples": 4, "precision": "fp32", "epochs": 2, "seed": 5,
            "checkpoint_every_steps": 2, "dpo_beta": 0.5}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
SLOW_STEPS = {"point": "train_step", "kind": "sleep", "seconds": 0.3, "min_step": 2}


def preference_lines(n: int = 20) -> list[str]:
    return [json.dumps({"prompt": f"{PROMPTS[i % 5]} ({i})", "chosen": f"It is {i}. Cheers, Bob",
                        "rejected": f"It is {i}."}) for i in range(n)]


def configure(root, model_dir, **training):
    write_config(root, model_dir, training={**TRAINING, **training}, limits={"max_attempts": 2, "min_free_disk_mb": 1})


def adapter(root, version=1) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors"))


def metadata(root, version=1) -> dict:
    return json.loads((root / "checkpoints" / "default" / f"v{version}" / "metadata.json").read_text())


def train(root, **env) -> None:
    r = cli(root, "run", "--once", **CPU_ONLY, **env)
    assert r.returncode == 0, f"{r.stdout[-3000:]}{r.stderr[-3000:]}\njobs: {jobs(root)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo-reference")
    configure(root, tiny_model_dir)
    drop(root, "prefs.jsonl", preference_lines())
    train(root)
    return root


def test_a_preference_file_trains_dpo_on_the_latest_version(root, tiny_model_dir):
    configure(root, tiny_model_dir)
    drop(root, "sft.jsonl", chat_lines(12))
    train(root)
    pool_before = (root / "checkpoints" / "default" / "eval_pool.jsonl").read_bytes()
    (root / "check.jsonl").write_text("\n".join(preference_lines()) + "\n")
    r = cli(root, "validate", str(root / "check.jsonl"))
    assert r.returncode == 0 and "(preference format)" in r.stdout, r.stdout + r.stderr
    drop(root, "prefs.jsonl", preference_lines())
    train(root)

    meta = metadata(root, 2)
    assert meta["method"] == "dpo" and meta["parent_version"] == 1
    pref = meta["preference"]
    assert (pref["beta"], pref["loss"], pref["reference"]) == (0.5, "sigmoid", "starting point")
    held = pref["eval"]
    assert held["pairs"] == 4 and 0 <= held["reward_accuracy"] <= 1
    assert {"reward_margin", "chosen_logps", "rejected_logps", "chosen_reward", "rejected_reward"} <= held.keys()
    assert meta["eval_loss"] == held["loss"]
    # The gate: the standing SFT set as for every version, and the held-out reward accuracy above chance.
    assert meta["judgement"]["new"]["reward_accuracy"] == held["reward_accuracy"]
    assert meta["judgement"]["new"]["standing_eval_loss"] is not None
    assert held["reward_accuracy"] > 0.5 and meta["promotion"]["decision"] == "promoted", meta["promotion"]
    assert meta["promotion"]["reason"].startswith("standing eval loss")
    assert metadata(root, 1)["method"] == "sft"
    progress = [e for e in events(root, "progress") if e.get("job_id") == meta["job_id"]]
    assert progress and all("reward_accuracy" in e for e in progress)
    (ev,) = [e for e in events(root, "eval") if e.get("job_id") == meta["job_id"]]
    assert ev["reward_accuracy"] == held["reward_accuracy"]
    # A preference file's held-out pairs are no yardstick for SFT versions: the eval pool is left as it was.
    assert (root / "checkpoints" / "default" / "eval_pool.jsonl").read_bytes() == pool_before
    # The next SFT file replays none of the preference pairs (they are not SFT examples).
    drop(root, "sft2.jsonl", chat_lines(12, "y"))
    train(root)
    assert metadata(root, 3)["method"] == "sft"
    assert all(f["source_file"] != "prefs.jsonl" for f in metadata(root, 3)["replay"]["files"])


@pytest.mark.slow
def test_a_killed_dpo_trainer_resumes_to_the_same_adapter(root, tiny_model_dir, uninterrupted):
    configure(root, tiny_model_dir)
    drop(root, "prefs.jsonl", preference_lines())
    kill = {"point": "train_step", "kind": "kill", "step": 5, "once_file": str(root / "fired")}
    train(root, TRAINING_DAEMON_FAULTS=faults(kill))
    (job,) = jobs(root)
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "done"]
    assert [e["checkpoint"] for e in events(root, "resumed") if "job_id" in e] == ["step-000004"]
    expected, got = adapter(uninterrupted), adapter(root)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert metadata(root)["preference"]["eval"] == metadata(uninterrupted)["preference"]["eval"]


@pytest.mark.slow
def test_a_warm_stopped_dpo_job_resumes_to_the_same_adapter(root, tiny_model_dir, uninterrupted):
    configure(root, tiny_model_dir)
    drop(root, "prefs.jsonl", preference_lines())
    daemon = start_daemon(root, **CPU_ONLY, TRAINING_DAEMON_FAULTS=faults(SLOW_STEPS))
    try:
        wait_for(lambda: [e for e in events(root, "progress") if e["step"] >= 3], timeout=180, what="step 3")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (job,) = jobs(root)
    assert job["folder"] == "pending" and job["attempts"][-1]["outcome"] == "stopped"
    train(root)
    expected, got = adapter(uninterrupted), adapter(root)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_out_of_memory_retries_with_half_the_micro_batch_and_trains_the_same_adapter(root, tiny_model_dir, tmp_path):
    plain = tmp_path / "plain"  # unpacked: halving the pairs per micro-batch keeps every step's pairs the same
    for where in (root, plain):
        where.mkdir(exist_ok=True)
        configure(where, tiny_model_dir, packing=False)
        drop(where, "prefs.jsonl", preference_lines())
    train(plain)
    train(root, TRAINING_DAEMON_FAULTS=faults({"point": "train_step", "kind": "oom", "micro_batch_gt": 1}))
    (job,) = jobs(root)
    assert [(a["micro_batch_size"], a["outcome"]) for a in job["attempts"]] == [(2, "out_of_memory"), (1, "done")]
    meta = metadata(root)
    assert meta["optimizer"]["micro_batch_size"] == 1 and meta["optimizer"]["gradient_accumulation"] == 2
    expected = adapter(plain)  # the same effective batch: the same adapter up to the order of fp32 additions
    for name, tensor in adapter(root).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert meta["preference"]["eval"]["loss"] == pytest.approx(metadata(plain)["preference"]["eval"]["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_gloo_processes_train_the_dpo_adapter_one_process_trains(root, tiny_model_dir, uninterrupted):
    write_config(root, tiny_model_dir, training=TRAINING, cpu_processes=2,
                 limits={"max_attempts": 1, "min_free_disk_mb": 1})
    drop(root, "prefs.jsonl", preference_lines())
    train(root)
    one, two = metadata(uninterrupted), metadata(root)
    assert (one["plan"]["processes"], two["plan"]["processes"]) == (1, 2)
    expected = adapter(uninterrupted)
    for name, tensor in adapter(root).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("reward_accuracy", "loss", "chosen_logps"):
        assert two["preference"]["eval"][key] == pytest.approx(one["preference"]["eval"][key], rel=1e-4, abs=1e-6)
