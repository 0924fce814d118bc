"""A job that trained nothing fails, and a model that does not fit its tokenizer or the file's format is refused
before training: each through the real daemon and trainer (`run --once`), as the user sees it.

Non-finite losses come from the fault hook (`nan` at `train_step`, daemon/faults.py); the misfits from variants
of the tiny model (tests/tiny_model.py) written as the base model: a tokenizer with more tokens than the model's
embedding, a word-level tokenizer that encodes nothing beside a Qwen2, no chat template or one that raises.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accounting import Inbox, account, faults
from helpers import chat_lines, cli, events, write_config
from tiny_model import build_tiny_model, build_word_level_qwen2

pytestmark = pytest.mark.slow


def versions_of(root: Path, adapter: str = "default") -> list[str]:
    folder = root / "checkpoints" / adapter
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("v")) if folder.is_dir() else []


def warning_lines(root: Path) -> list[str]:
    return [line for line in (root / "status.log").read_text().splitlines() if " WARNING " in line]


def error_kind(job: dict) -> str:
    return json.loads((Path(job["dir"]) / "error.json").read_text())["kind"]


# ------------------------------------------------------------------ point 2: a job that trained nothing fails

def test_a_job_whose_every_step_is_non_finite_fails_as_no_steps_and_publishes_nothing(root, tiny_model_dir):
    write_config(root, tiny_model_dir)  # micro-batch 2, no accumulation: 2 lines are one step
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(2))

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "train_step", "kind": "nan"}))
    assert r.returncode == 1

    reason = "no optimizer step completed: every step was non-finite (steps 1..1)"
    job = account(root, inbox, expect={"data.jsonl": "failed"}, reasons={"data.jsonl": reason})["data.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["bad_input"]  # retrying cannot help
    assert error_kind(job) == "no_steps"
    assert versions_of(root) == []
    [warning] = warning_lines(root)
    assert "job 1: step 1 skipped, the loss or gradient is not finite (loss=nan" in warning
    assert reason in cli(root, "jobs").stdout


def test_a_run_with_some_non_finite_steps_publishes_with_a_warning_for_each(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"packing": False})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(12))  # 6 steps; the 2nd and the 4th have a non-finite loss
    nan = [{"point": "train_step", "kind": "nan", "step": done, "once_file": str(root / f"nan-after-{done}")}
           for done in (1, 2)]  # `step` counts completed steps: after 1 and after 2

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults(*nan))
    assert r.returncode == 0, r.stdout + r.stderr

    job = account(root, inbox, expect={"data.jsonl": "done"})["data.jsonl"]
    meta = json.loads((root / "checkpoints/default/v1/metadata.json").read_text())
    assert (meta["steps"], meta["steps_skipped"]) == (4, 2) and job["version"] == 1
    warnings = warning_lines(root)
    assert len(warnings) == 2
    assert "job 1: step 2 skipped, the loss or gradient is not finite (loss=nan" in warnings[0]
    assert "job 1: step 4 skipped" in warnings[1] and "1 in a row, limits.max_diverged_steps=3" in warnings[1]
    assert [e["level"] for e in events(root, "log") if "skipped" in e["message"]] == ["warning", "warning"]


def test_a_non_finite_final_step_fails_the_job_as_diverged(root, tiny_model_dir):
    write_config(root, tiny_model_dir, training={"packing": False})
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(8))  # 4 steps: the last one is non-finite

    r = cli(root, "run", "--once", TRAINING_DAEMON_FAULTS=faults({"point": "train_step", "kind": "nan", "step": 3}))
    assert r.returncode == 1

    reason = "diverged at step 4: the final loss is not finite (steps 4..4, the last of the run, were skipped)"
    job = account(root, inbox, reasons={"data.jsonl": reason})["data.jsonl"]
    assert [a["outcome"] for a in job["attempts"]] == ["bad_input"] and error_kind(job) == "diverged"
    assert versions_of(root) == []


# ------------------------------------------------------------ point 4: model and data must fit each other

def refused_before_loading(root: Path, job: dict, code: str) -> dict:
    """The job's report says `code`, and the trainer never reached the model (no "loading" phase: phases are
    debug events, so the run must log at debug)."""
    report = json.loads((Path(job["dir"]) / "report.json").read_text())
    assert report["fatal"]["code"] == code and not report["ok"]
    assert [a["outcome"] for a in job["attempts"]] == ["bad_input"] and error_kind(job) == "bad_input"
    phases = [e["phase"] for e in events(root, "phase") if e.get("job_id") == job["id"]]
    assert "validating" in phases and "loading" not in phases, phases
    return report


def test_a_tokenizer_with_more_tokens_than_the_model_embedding_is_refused_naming_both(root, tmp_path):
    model = build_tiny_model(tmp_path / "model", added_tokens=5)
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    write_config(root, model)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    assert cli(root, "run", "--once", TRAINING_DAEMON_LOG_LEVEL="debug").returncode == 1

    reason = (f"data.jsonl: REJECTED (vocab_mismatch): the tokenizer has {rows + 5} tokens but the model's "
              f"embedding has {rows} rows (vocab_size in config.json)")
    job = account(root, inbox, reasons={"data.jsonl": reason})["data.jsonl"]
    refused_before_loading(root, job, "vocab_mismatch")
    assert versions_of(root) == []


def test_a_tokenizer_that_encodes_nothing_is_refused_naming_the_probe_and_its_class(root, tmp_path):
    from transformers import AutoTokenizer

    model = build_word_level_qwen2(tmp_path / "qwen2-word-level")
    tokenizer_class = type(AutoTokenizer.from_pretrained(model)).__name__
    write_config(root, model)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))

    assert cli(root, "run", "--once", TRAINING_DAEMON_LOG_LEVEL="debug").returncode == 1

    reason = f"the tokenizer ({tokenizer_class}) returns no token ids for the probe 'Hello, world'"
    job = account(root, inbox, reasons={"data.jsonl": reason})["data.jsonl"]
    refused_before_loading(root, job, "tokenizer_encodes_nothing")


def test_without_a_chat_template_chat_data_is_refused_and_plain_data_still_trains(root, tmp_path):
    write_config(root, build_tiny_model(tmp_path / "base", chat_template=None))
    inbox = Inbox(root)
    inbox.drop("chats.jsonl", chat_lines(4))
    inbox.drop("pairs.jsonl", [json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) for i in range(4)])

    assert cli(root, "run", "--once", TRAINING_DAEMON_LOG_LEVEL="debug").returncode == 1

    fates = account(root, inbox, expect={"chats.jsonl": "failed", "pairs.jsonl": "done"},
                    reasons={"chats.jsonl": "REJECTED (no_chat_template): the base model's tokenizer has no chat "
                                            "template, needed for the 'messages' format"})
    refused_before_loading(root, fates["chats.jsonl"], "no_chat_template")


def test_a_chat_template_that_cannot_render_the_format_is_one_error_for_the_file(root, tmp_path):
    template = "{{ raise_exception('this template only renders tool calls') }}"
    write_config(root, build_tiny_model(tmp_path / "base", chat_template=template))
    inbox = Inbox(root)
    inbox.drop("chats.jsonl", chat_lines(4))
    inbox.drop("notes.jsonl", [json.dumps({"text": f"note number {i}"}) for i in range(4)])  # needs no template

    assert cli(root, "run", "--once", TRAINING_DAEMON_LOG_LEVEL="debug").returncode == 1

    reason = ("REJECTED (chat_template_error): the base model's chat template cannot render a messages "
              "conversation (one user and one assistant message): TemplateError: this template only renders tool "
              "calls")
    fates = account(root, inbox, expect={"chats.jsonl": "failed", "notes.jsonl": "done"},
                    reasons={"chats.jsonl": reason})
    report = refused_before_loading(root, fates["chats.jsonl"], "chat_template_error")
    assert report["skipped"] == 0  # one error for the file, not one per line
