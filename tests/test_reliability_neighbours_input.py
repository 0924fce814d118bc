"""Hostile neighbours, part input (issue 13, rows 2, 9, 10, 11): what a local user, a careless script or a file
from elsewhere puts in front of the daemon - a file name full of terminal escapes, a config that is a YAML bomb,
a device or a FIFO where a file belongs, a root that is a system folder - ends in a one-line answer, at once,
and never reaches a terminal raw. Each test runs the real CLI (and daemon) as processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from accounting import Inbox, account
from helpers import ENTRY, chat_lines, cli, env, events, write_config

ESCAPES = "x\x1b]0;pwned\x07\x1b[31mRED"  # sets the terminal's title, then paints it red
SHOWN = "x\\x1b]0;pwned\\x07\\x1b[31mRED"  # what a person must read instead
BIDI = "bad\u202egpj"  # shows as "badjpg" followed by the rest reversed


def run_cli(*args: str, cwd, timeout: float = 60, **extra) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI without the --root helpers.cli adds: these tests choose the root (or its absence) themselves."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(ENTRY), *args], capture_output=True, text=True, timeout=timeout,
                       env=env(**extra), cwd=cwd)
    return r, time.monotonic() - start


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error: "), r.stderr
    return r.stderr


def config_error(r: subprocess.CompletedProcess) -> str:
    """A ConfigError: its header line, then exactly one issue line."""
    text = one_line_error(r)
    lines = text.strip().splitlines()
    assert len(lines) == 2 and "has 1 error" in lines[0], text
    return lines[1]


# ------------------------------------------------------------------ row 2: terminal escapes in names
@pytest.mark.slow
def test_a_file_name_full_of_terminal_escapes_is_shown_escaped_and_kept_raw_in_json(root, tiny_model_dir):
    write_config(root, tiny_model_dir, limits={"max_attempts": 1, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop(f"{ESCAPES}.jsonl", chat_lines(4))
    inbox.drop(f"{BIDI}.jsonl", b"this is not json\n")

    r = cli(root, "run", "--once", timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr  # the second file fails validation
    account(root, inbox)
    log = (root / "status.log").read_text()
    for shown in (r.stdout, log):  # the journal (stdout) and status.log
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    started = [line for line in log.splitlines() if " started: " in line]
    assert started and SHOWN in started[0]
    assert "\\u202e" in log

    for args in (("jobs",), ("logs", "-n", "200"), ("status",)):
        out = cli(root, *args, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u202e" not in out.stdout, args
    jobs = cli(root, "jobs").stdout
    assert SHOWN[:20] in jobs and "bad\\u202egpj" in jobs

    # JSON keeps the data as it is: job.json, `jobs --json`, events.jsonl
    raw = {j["original_name"] for j in json.loads(cli(root, "jobs", "--json").stdout)}
    assert raw == {f"{ESCAPES}.jsonl", f"{BIDI}.jsonl"}
    assert any(e.get("file") == f"{ESCAPES}.jsonl" for e in events(root, "job_queued"))
    done = [json.loads(p.read_text()) for p in (root / "queue" / "done").glob("*/job.json")]
    assert [j["original_name"] for j in done] == [f"{ESCAPES}.jsonl"]


# ------------------------------------------------------------------ row 9: YAML bombs
def _bombs() -> dict[str, str]:
    lists = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    maps = ["m0: &m0 {a: 1, b: 1, c: 1, d: 1, e: 1, f: 1, g: 1, h: 1, i: 1}"]
    for i in range(1, 10):
        lists.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
        maps.append(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}")
    few = ["b0: &b0 [" + ", ".join(["x"] * 50) + "]"] + [f"b{i}: &b{i} [*b{i - 1}, *b{i - 1}]" for i in range(1, 9)]
    return {
        "lists": "\n".join(lists), "maps": "\n".join(maps), "recursive": "loop: &a [1, *a]",
        "deep": "deep: " + "[" * 20000 + "]" * 20000, "mapping-deep": "deep: " + "{a: " * 20000 + "1" + "}" * 20000,
        "expands": "\n".join(few),  # 16 aliases only, but 50 x 2^8 values once expanded
        "huge-number": "training:\n  epochs: " + "9" * 5000,
    }


@pytest.mark.parametrize("kind", list(_bombs()))
def test_a_yaml_bomb_in_the_config_is_refused_in_a_line_at_once(root, tiny_model_dir, kind):
    config = write_config(root, tiny_model_dir)
    config.write_text(config.read_text() + _bombs()[kind] + "\n")

    r, took = run_cli("config", "check", "--config", str(config), cwd=root)
    assert r.returncode == 2, r.stdout + r.stderr
    assert took < 5, took
    line = config_error(r)
    assert "YAML refused" in line or "YAML value refused" in line, line
    assert len(line) < 400

    r, took = run_cli("run", "--once", "--root", str(root), cwd=root)  # the daemon refuses it the same way
    assert r.returncode == 2 and took < 5, (took, r.stderr)
    config_error(r)
    assert not (root / "queue").exists()


def test_a_few_aliases_still_work_and_a_huge_value_is_shown_cut(root, tiny_model_dir):
    config = root / "config" / "daemon.yaml"
    config.parent.mkdir()
    aliased = "training: {learning_rate: &small 0.001, weight_decay: *small}"
    config.write_text(f"base_model: {tiny_model_dir}\n{aliased}\n")
    r, took = run_cli("config", "check", "--config", str(config), cwd=root)
    assert r.returncode == 0 and took < 5, r.stderr
    assert "weight_decay: 0.001" in r.stdout

    config.write_text(config.read_text() + "lora: {r: " + "7" * 4000 + "}\n")
    r, took = run_cli("config", "check", "--config", str(config), cwd=root)
    assert r.returncode == 2 and took < 5
    line = config_error(r)
    assert line.startswith("  lora.r: too large (got a number of about 400"), line  # 4000 digits, not printed


# ------------------------------------------------------------------ row 10: devices, FIFOs, odd places
def test_devices_and_fifos_are_refused_before_they_are_opened(root, tiny_model_dir, tmp_path):
    config = write_config(root, tiny_model_dir)
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    for args, code, says in [
        (("validate", "/dev/zero"), 1, "data file /dev/zero is a character device, not a regular file"),
        (("validate", str(fifo)), 1, "is a FIFO (named pipe), not a regular file"),
        (("config", "check", "--config", "/dev/zero"), 2, "/dev/zero is a character device, not a regular file"),
        (("config", "check", "--config", str(fifo)), 2, "is a FIFO (named pipe), not a regular file"),
    ]:
        r, took = run_cli(*args, "--root", str(root), cwd=root, timeout=30)
        assert r.returncode == code and took < 5, (args, took, r.stderr)
        assert says in one_line_error(r), r.stderr
    assert config.exists()


def test_export_into_proc_and_an_unforeseen_failure_are_one_line(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    r, took = run_cli("export", "default", "--merge", "/proc/out", "--root", str(root), cwd=root)
    assert r.returncode == 1 and took < 5
    assert one_line_error(r).strip() == "Error: cannot write the merged model to /proc/out: /proc/out is in a " \
                                        "system folder"

    (root / "queue").write_text("not a folder\n")  # nothing plans for this: the catch-all speaks
    r, _ = run_cli("jobs", "--root", str(root), cwd=root)
    assert r.returncode == 1
    text = one_line_error(r)
    assert len(text.strip().splitlines()) == 1 and "full traceback in " in text, text
    report = text.split("full traceback in ")[1].split(";")[0]
    assert "Traceback" in open(report).read()
    os.unlink(report)
    r, _ = run_cli("jobs", "--root", str(root), cwd=root, TRAINING_DAEMON_DEBUG="1")
    assert "Traceback" in r.stderr  # and a developer can still see it


@pytest.mark.slow
def test_ask_with_a_base_that_ships_its_own_code_answers_or_refuses_in_a_line(root, tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model-with-code")
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    write_config(root, model)
    r, _ = run_cli("ask", "What is x?", "--max-new-tokens", "2", "--root", str(root), cwd=root, timeout=300,
                   HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0 or len(one_line_error(r).strip().splitlines()) == 1, r.stderr
    assert not marker.exists()  # trust_remote_code is off: the model's code never ran


# ------------------------------------------------------------------ rows 10 and 11: the root
@pytest.mark.parametrize("where", ["/", "/etc", "/usr", "/proc/self", "/tmp", "a file"])
def test_a_root_that_is_a_system_folder_or_a_file_is_refused(root, tiny_model_dir, where):
    target = str(root / "plain-file") if where == "a file" else where
    (root / "plain-file").write_text("x\n")
    config = write_config(root, tiny_model_dir)
    config.write_text(config.read_text() + f"root: {target}\n")
    before = {p for p in ("/inbox", "/queue", "/state", "/checkpoints") if os.path.exists(p)}

    r, took = run_cli("run", "--once", "--config", str(config), cwd="/", timeout=30)
    assert r.returncode == 2 and took < 5, r.stderr
    line = config_error(r)
    assert line.startswith("  root: ") and ("is a system folder" in line or "is not a folder" in line), line
    r, _ = run_cli("config", "check", "--config", str(config), cwd=root)
    assert r.returncode == 2
    config_error(r)

    if where != "a file":  # --root and $TRAINING_DAEMON_ROOT are held to the same rule
        r, _ = run_cli("status", "--root", where, cwd=root)
        assert r.returncode == 1 and "invalid data root" in one_line_error(r)
        r, _ = run_cli("pause", cwd=root, TRAINING_DAEMON_ROOT=where)
        assert r.returncode == 1 and "invalid data root" in one_line_error(r)
    assert {p for p in ("/inbox", "/queue", "/state", "/checkpoints") if os.path.exists(p)} == before
