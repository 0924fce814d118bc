"""The process boundary: the daemon process (daemon/supervisor/ and the shared core daemon/*.py) never loads the
training stack, and the trainer (daemon/trainer/) never loads the daemon's code.

The daemon runs for months beside a GPU: torch would cost it seconds at start, gigabytes of memory and a CUDA
context it must not hold while a trainer child needs the whole GPU. A lazy import inside a function counts too,
since it loads just the same, only later. The static half reads the source (every import at any depth, followed
through the daemon's own modules); the dynamic half runs a real daemon cycle and looks at sys.modules.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PROJECT, chat_lines, drop, env, jobs, write_config

HEAVY = {"torch", "transformers", "peft", "accelerate"}
DAEMON = PROJECT / "daemon"


def module_name(path: Path, project: Path = PROJECT) -> str:
    parts = path.relative_to(project).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # every module is reached from many starting points
def imports_of(path: Path, project: Path = PROJECT) -> frozenset[str]:
    """Every module `path` imports, wherever the import sits (top level, a function, a try block), including
    `importlib.import_module("x")` and `__import__("x")` with a literal name. `from a import b` yields both a
    and a.b, since b may be a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, project)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return frozenset(found)


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def daemon_modules() -> dict[str, Path]:
    return {module_name(p): p for p in DAEMON.rglob("*.py")}


def reachable(start: str, modules: dict[str, Path]) -> dict[str, str]:
    """The daemon modules `start` loads, directly or through others: {module: the module that imports it}."""
    seen, todo = {start: start}, [start]
    while todo:
        current = todo.pop()
        for name in imports_of(modules[current]):
            if name in modules and name not in seen:
                seen[name] = current
                todo.append(name)
    return seen


def chain(seen: dict[str, str], module: str) -> str:
    """`a -> b -> c`: how the start module came to load `module`."""
    path = [module]
    while seen[path[-1]] != path[-1]:
        path.append(seen[path[-1]])
    return " -> ".join(reversed(path))


def daemon_side(modules: dict[str, Path]) -> list[str]:
    """The supervisor and the shared core. daemon.cli is the user's command: it dispatches to both sides."""
    return sorted(m for m in modules if not m.startswith("daemon.trainer") and m != "daemon.cli")


def test_the_daemon_side_never_imports_the_training_stack_or_the_trainer():
    modules = daemon_modules()
    side = daemon_side(modules)
    assert "daemon.supervisor.loop" in side and "daemon.protocol" in side and "daemon.cli" not in side
    problems = set()
    for start in side:
        seen = reachable(start, modules)
        for module in seen:
            if module.startswith("daemon.trainer") or module == "daemon.cli":
                problems.add(f"{chain(seen, module)}: the daemon process must not load the trainer's code")
            heavy = sorted(n for n in imports_of(modules[module]) if n.split(".")[0] in HEAVY)
            if heavy:
                problems.add(f"{chain(seen, module)} imports {', '.join(heavy)}")
    assert not problems, "\n".join(sorted(problems))


def test_the_trainer_never_imports_the_daemon_process_code():
    modules = daemon_modules()
    trainer = sorted(m for m in modules if m.startswith("daemon.trainer"))
    assert "daemon.trainer.main" in trainer
    problems = set()
    for start in trainer:
        seen = reachable(start, modules)
        problems.update(chain(seen, m) for m in seen if m.startswith("daemon.supervisor") or m == "daemon.cli")
    assert not problems, "\n".join(sorted(problems))


def test_the_import_scan_sees_lazy_relative_and_dynamic_imports(tmp_path):
    source = tmp_path / "daemon" / "supervisor" / "sample.py"
    source.parent.mkdir(parents=True)
    source.write_text("import importlib\n"
                      "def later():\n"
                      "    try:\n"
                      "        import torch.cuda\n"
                      "    except ImportError:\n"
                      "        from ..trainer import recipe\n"
                      "    return importlib.import_module('peft')\n")
    found = imports_of(source, project=tmp_path)
    assert {"torch.cuda", "daemon.trainer", "daemon.trainer.recipe", "peft"} <= found


# A daemon process that reports, when it exits, which modules of the training stack it had loaded.
_RUN_AND_REPORT = """
import json, sys
from daemon.cli import main
report, argv = sys.argv[1], sys.argv[2:]
try:
    main(argv)
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r} or m.startswith("daemon.trainer"))
    with open(report, "w") as f:
        json.dump(heavy, f)
"""


@pytest.mark.slow  # a real training run in a trainer child: several seconds on 2 cores
def test_a_daemon_that_trains_a_job_never_loads_torch(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    drop(root, "data.jsonl", chat_lines(6))
    report = root / "modules.json"
    code = _RUN_AND_REPORT.format(heavy=sorted(HEAVY))
    r = subprocess.run([sys.executable, "-c", code, str(report), "run", "--once", "--root", str(root)],
                       capture_output=True, text=True, timeout=300, env=env(), cwd=PROJECT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [j["folder"] for j in jobs(root)] == ["done"]  # the trainer child did load torch, and trained
    assert json.loads(report.read_text()) == []
