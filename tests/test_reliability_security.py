"""Security: names cannot leave their folders, a model's own code does not run unless the config says so,
nothing the daemon creates is world-writable, and no shell ever sees a command line.
"""

from __future__ import annotations

import ast
import json
import shutil
import stat
import subprocess
import sys

import pytest

from accounting import Inbox, account
from helpers import ENTRY, PROJECT, chat_lines, cli, env, events, write_config

# A model folder may ship Python (config.json "auto_map"); importing it runs it. This one leaves a mark.
EVIL = """from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel
"""


@pytest.mark.slow
def test_a_models_own_code_runs_only_when_the_config_trusts_it(root, tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model-with-code")
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    write_config(root, model, limits={"max_attempts": 1, "min_free_disk_mb": 1})
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4))

    r = cli(root, "run", "--once")  # trust_remote_code is off by default
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
    assert not marker.exists()

    write_config(root, model, trust_remote_code=True, limits={"max_attempts": 1, "min_free_disk_mb": 1})
    inbox.drop("second.jsonl", chat_lines(4, "second"))
    cli(root, "run", "--once", HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert marker.exists()  # the same folder, trusted: its code ran (so the check above can fail)
    account(root, inbox)


def test_adapter_and_version_names_cannot_leave_their_folders(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    stray = {}
    for folder in ("-rf", "has space", "..."):
        (root / "inbox" / folder).mkdir(parents=True)
        (root / "inbox" / folder / "data.jsonl").write_bytes(stray.setdefault(folder, f"{folder}\n".encode()))
    (tmp_path / "data.jsonl").write_text("\n".join(chat_lines(2)) + "\n")

    r = cli(root, "run", "--once", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    reasons = {e["path"]: e["message"] for e in events(root, "file_rejected")}
    for folder, data in stray.items():
        assert "is not followed: invalid adapter name" in reasons[str(root / "inbox" / folder)]
        assert (root / "inbox" / folder / "data.jsonl").read_bytes() == data  # left alone, not taken
    account(root, Inbox(root))  # no job came of them

    before = set(tmp_path.rglob("*"))
    for args in (["submit", str(tmp_path / "data.jsonl"), "--adapter", "../../escape"],
                 ["export", "../../etc", "--merge", str(tmp_path / "out")],
                 ["export", "default@../../etc", "--merge", str(tmp_path / "out")],
                 ["ask", "hi", "--adapter", "default@../x"]):
        r = cli(root, *args, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("Error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr and ("invalid adapter name" in r.stderr or "bad version" in r.stderr)
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere, inside the root or out of it


@pytest.mark.slow
def test_files_the_daemon_creates_are_never_world_writable(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("data.jsonl", chat_lines(4))
    mine = {p for p in root.rglob("*")}

    for args in (["run", "--once"], ["pause"]):  # the daemon, its trainer, and a control command
        r = subprocess.run([sys.executable, str(ENTRY), *args, "--root", str(root)], capture_output=True, text=True,
                           env=env(), cwd=root, umask=0, timeout=300)  # the loosest umask a user could have
        assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)

    created = [p for p in root.rglob("*") if p not in mine and not p.is_symlink()]
    assert any(p.name == "adapter_model.safetensors" for p in created) and (root / "state/paused") in created
    writable = [str(p.relative_to(root)) for p in created if p.lstat().st_mode & stat.S_IWOTH]
    assert not writable


SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("pty", "spawn")}
RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}


def test_nothing_is_ever_passed_to_a_shell():
    """Every process the code starts gets an argument list: no shell=True, no os.system, no command string."""
    problems = []
    for path in sorted((PROJECT / "daemon").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.name}:{node.lineno}"
            if (owner, node.func.attr) in SHELL_CALLS:
                problems.append(f"{where}: {owner}.{node.func.attr}")
            if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                problems.append(f"{where}: shell=")
            if owner == "subprocess" and node.func.attr in RUNNERS and node.args and \
                    isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where}: a command line as one string")
    assert not problems
