"""The product's spine, end to end: drop a JSONL, the real daemon trains it in a real child process."""

from __future__ import annotations

import json

from helpers import chat_lines, cli, drop, events, jobs, write_config


def test_drop_train_publish_versions(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    drop(root, "first data.jsonl", chat_lines(8, "apple"))
    drop(root, "second.jsonl", chat_lines(6, "pear"))
    drop(root, "mine.jsonl", chat_lines(6, "plum"), adapter="support-bot")

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr

    done = jobs(root)
    assert [j["folder"] for j in done] == ["done", "done", "done"]
    assert [j["original_name"] for j in done] == ["first data.jsonl", "second.jsonl", "mine.jsonl"]
    # The original bytes are kept, unchanged, in the job folder.
    from pathlib import Path

    first = Path(done[0]["dir"]) / "input.jsonl"
    assert first.read_text() == "\n".join(chat_lines(8, "apple")) + "\n"

    default = root / "checkpoints" / "default"
    # latest.json (which version `latest` is), its lock and the eval pool sit beside the versions
    assert sorted(p.name for p in default.iterdir()
                  if not p.name.startswith(".") and p.suffix not in (".json", ".jsonl")) == ["latest", "v1", "v2"]
    assert (default / "latest").resolve() == (default / "v2").resolve()
    meta1 = json.loads((default / "v1" / "metadata.json").read_text())
    meta2 = json.loads((default / "v2" / "metadata.json").read_text())
    assert meta1["parent_version"] is None and meta2["parent_version"] == 1  # mode "continue"
    for key in ("adapter", "version", "base_model", "job_id", "source_file", "source_sha256", "examples_trained",
                "tokens_trained", "epochs", "steps", "first_train_loss", "final_train_loss", "lora", "optimizer",
                "started_at", "finished_at", "training_seconds", "device", "libraries"):
        assert key in meta2, key
    assert meta1["source_file"] == "first data.jsonl" and meta1["steps"] >= 1
    assert (root / "checkpoints" / "support-bot" / "v1" / "adapter_model.safetensors").exists()

    # A standard PEFT adapter: loadable with PeftModel.from_pretrained.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), default / "v2")
    assert model is not None

    log = (root / "status.log").read_text()
    assert "job 1 done" in log and "v2" in log
    kinds = {e["event"] for e in events(root)}
    assert {"file_seen", "job_queued", "job_started", "progress", "job_done", "gpu_memory"} <= kinds
    status = json.loads((root / "status.json").read_text())
    assert status["queue"]["done"] == 3


def test_bad_file_fails_with_report_and_queue_goes_on(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    drop(root, "broken.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}', "not json"])
    drop(root, "good.jsonl", chat_lines(4))

    r = cli(root, "run", "--once")
    assert r.returncode == 1  # --once: non-zero when any job failed

    failed, done = jobs(root)
    assert failed["folder"] == "failed" and done["folder"] == "done"
    report = json.loads((root / "queue" / "failed" / "j000001" / "report.json").read_text())
    codes = {e["code"] for e in report["errors"]}
    assert {"missing_assistant", "invalid_json"} <= codes
    out = cli(root, "jobs", "--json")
    rows = json.loads(out.stdout)
    assert rows[0]["state"] == "failed" and rows[0]["error"]
    assert not (root / "checkpoints" / "default" / "v2").exists()


def test_trainer_crash_reports_full_traceback(root, tiny_model_dir):
    write_config(root, tiny_model_dir, limits={"max_attempts": 2, "min_free_disk_mb": 1})
    drop(root, "data.jsonl", chat_lines(4))
    fault = json.dumps([{"point": "train_step", "kind": "error", "step": 0}])
    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=fault)
    assert r.returncode == 1
    (job,) = jobs(root)
    assert job["folder"] == "failed"
    assert len([a for a in job["attempts"] if a["outcome"] == "failed"]) == 2
    assert "Traceback (most recent call last)" in job["error"]
    assert "injected fault at train_step step 0" in job["error"]
