"""Shared helpers for tests that run the real daemon and trainer as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
ENTRY = PROJECT / "training_daemon.py"


def write_config(root: Path, model_dir: Path, **sections) -> Path:
    """A small, fast daemon config for the tiny model at root/config/daemon.yaml; `sections` override keys."""
    cfg = {
        "base_model": str(model_dir),
        "intake": {"settle_seconds": 0.2, "rescan_seconds": 1},
        "training": {"max_length": 128, "micro_batch_size": 2, "gradient_accumulation": 1, "epochs": 1,
                     "learning_rate": 1e-3, "eval_fraction": 0.0, "checkpoint_every_steps": 2,
                     "warmup_ratio": 0.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "limits": {"min_free_disk_mb": 1},
        "status": {"progress_every_steps": 1, "web": {"enabled": False}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = root / "config" / "daemon.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat_lines(n: int, topic: str = "x") -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": f"What is {topic} number {i}?"},
                                     {"role": "assistant", "content": f"{topic} number {i} is {i * 7 % 13}."}]})
            for i in range(n)]


def drop(root: Path, name: str, lines: list[str] | bytes, adapter: str | None = None) -> Path:
    """Write a file into the inbox the way a careful user would: write elsewhere, then rename in."""
    folder = root / "inbox" / adapter if adapter else root / "inbox"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    tmp.write_bytes(data)
    os.rename(tmp, folder / name)
    return folder / name


def env(**extra) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
             OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    e.update({k: v for k, v in extra.items() if v is not None})
    return e


def cli(root: Path, *args: str, timeout: float = 300, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY), *args, "--root", str(root)], capture_output=True, text=True,
                          timeout=timeout, env=env(**env_extra), cwd=root)


def start_daemon(root: Path, *args: str, **env_extra) -> subprocess.Popen:
    log = open(root / "daemon.out", "ab")
    return subprocess.Popen([sys.executable, str(ENTRY), "run", "--root", str(root), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env(**env_extra), cwd=root)


def wait_for(predicate, timeout: float = 120, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def jobs(root: Path) -> list[dict]:
    out = []
    for state in ("pending", "running", "done", "failed"):
        d = root / "queue" / state
        if d.is_dir():
            for j in sorted(d.iterdir()):
                if (j / "job.json").exists():
                    out.append({**json.loads((j / "job.json").read_text()), "folder": state, "dir": str(j)})
    return sorted(out, key=lambda j: j["id"])


def events(root: Path, kind: str | None = None) -> list[dict]:
    path = root / "events.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["event"] == kind]
