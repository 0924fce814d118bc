"""The daemon end to end, timed from outside: drop a file, watch it train, check that the GPU comes back.

    python bench/daemon_e2e.py --config config/demo.yaml --data examples/made_up_fact.jsonl \
        --questions examples/questions.json --out e2e.json

Starts the real daemon (`training_daemon.py run`) on a fresh root, waits until it is idle, then drops the
file into the inbox the way a user would (written under a `.part` name, renamed in) and tails events.jsonl,
stamping each event on arrival. Figures: daemon start to ready, drop to queued / trainer started / first
optimizer step / version published, tokens/s from the progress events, peak GPU memory from the version's
metadata, and GPU memory used (NVML, whole device) before the daemon started, during the job and until it is
back at its baseline after the job. `--jobs N` drops the file N times, one after the other finished (the
config's duplicate policy is set to `train`), to separate first-job costs (kernel compilation, caches)
from the steady state. With `--questions`, the greedy answers of the base and of the new
version to the probe and control questions (`training_daemon.py ask`, before the daemon starts and after it
stops, so they do not count in the memory figures).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
MIB = 1024**2


def nvml_used_mib() -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
    except Exception:
        return None


def td(root: Path, config: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PROJECT / "training_daemon.py"), *args, "--root", str(root), "--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ask_all(root: Path, config: Path, questions: dict, adapter: str | None) -> dict:
    answers = {}
    for key, q in questions.items():
        extra = ("--adapter", adapter) if adapter else ()
        r = td(root, config, "ask", *extra, q["question"])
        answers[key] = {"question": q["question"], "answer": r.stdout.strip() or r.stderr.strip()[-300:]}
    return answers


class EventTail:
    """Reads events.jsonl as it grows; stamps each event with the time this process saw it."""

    def __init__(self, path: Path):
        self.path, self.pos, self.events = path, 0, []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        new = []
        for line in data[:cut].splitlines():
            ev = json.loads(line)
            ev["seen_unix"] = time.time()
            new.append(ev)
        self.events += new
        return new

    def first(self, kind: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == kind), None)


def wait_until(pred, timeout: float, what: str, tick: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(tick)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_one_job(root: Path, args, tail: EventTail, n: int, baseline: float | None) -> dict:
    """Drop the file as a user would (written under a .part name, renamed in) and time the job it becomes."""
    inbox = root / "inbox"
    name = args.data.name if n == 1 else f"{args.data.stem}-{n}{args.data.suffix}"
    part = inbox / f".{name}.part"
    part.write_bytes(args.data.read_bytes())
    skip = len(tail.events)
    t_drop = time.time()
    os.rename(part, inbox / name)

    def mine(kind: str) -> dict | None:
        return next((e for e in tail.events[skip:] if e.get("event") == kind), None)

    peak_used = baseline or 0.0

    def finished():
        nonlocal peak_used
        tail.poll()
        used = nvml_used_mib()
        if used is not None:
            peak_used = max(peak_used, used)
        return mine("job_done") or mine("job_failed")

    end = wait_until(finished, args.timeout, f"job {n} to finish", tick=0.05)
    back_s = None
    if baseline is not None:
        wait_until(lambda: nvml_used_mib() <= baseline + 64, 60, "GPU memory back at baseline")
        back_s = time.time() - end["seen_unix"]
    wait_until(lambda: tail.poll() or mine("gpu_memory"), 30, "the daemon's GPU memory check")

    def since_drop(kind: str) -> float | None:
        ev = mine(kind)
        return round(ev["seen_unix"] - t_drop, 2) if ev else None

    progress = [e for e in tail.events[skip:] if e.get("event") == "progress"]
    phases = [[e.get("phase"), round(e["seen_unix"] - t_drop, 2)]
              for e in tail.events[skip:] if e.get("event") == "phase"]
    gpu_check = mine("gpu_memory") or {}
    return {
        "file": name, "ok": end.get("event") == "job_done",
        "drop_to_queued_s": since_drop("job_queued"),
        "drop_to_trainer_started_s": since_drop("job_started"),
        "drop_to_validated_s": since_drop("validated"),
        "drop_to_first_step_s": since_drop("first_step"),
        "drop_to_done_s": round(end["seen_unix"] - t_drop, 2),
        "phases_s_after_drop": phases,
        "steps": progress[-1]["step"] if progress else None,
        "tokens_per_s_median": sorted(e["tokens_per_s"] for e in progress)[len(progress) // 2] if progress else None,
        "losses": [[e["step"], e["loss"]] for e in progress],
        "gpu_used_mib_peak_during_job": round(peak_used, 1) if baseline is not None else None,
        "gpu_back_to_baseline_s_after_done": round(back_s, 2) if back_s is not None else None,
        "daemon_gpu_check": {k: gpu_check.get(k)
                             for k in ("message", "before_gib", "after_gib", "released", "seconds")},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=PROJECT / "config/demo.yaml")
    ap.add_argument("--data", type=Path, default=PROJECT / "examples/made_up_fact.jsonl")
    ap.add_argument("--questions", type=Path, help="probe/control questions to ask before and after")
    ap.add_argument("--root", type=Path, help="daemon root (default: a new temporary folder)")
    ap.add_argument("--jobs", type=int, default=1, help="drop the file this many times, one after another")
    ap.add_argument("--idle", type=float, default=0.0,
                    help="seconds the daemon sits idle before each drop (files rarely arrive back to back; an "
                         "idle daemon has its next trainer's imports done: trainer_prestart)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    root = args.root or Path(tempfile.mkdtemp(prefix="td-e2e-"))
    config = args.config.resolve()
    if args.jobs > 1:
        import yaml

        cfg = yaml.safe_load(config.read_text())
        cfg.setdefault("intake", {})["duplicate_policy"] = "train"
        (root / "config").mkdir(parents=True, exist_ok=True)
        config = root / "config" / "e2e.yaml"  # embedded: and absolute base models only (paths are config-relative)
        config.write_text(yaml.safe_dump(cfg))
    result: dict = {"root": str(root), "config": str(args.config), "data": str(args.data), "jobs": []}
    questions = json.loads(args.questions.read_text()) if args.questions else None
    if questions:
        result["before"] = ask_all(root, config, questions, None)

    result["gpu_used_mib_baseline"] = baseline = nvml_used_mib()
    tail = EventTail(root / "events.jsonl")
    t_start = time.time()
    # debug: the trainer's phase events (validating, loading, training, saving) reach events.jsonl too
    env = dict(os.environ, TRAINING_DAEMON_LOG_LEVEL="debug")
    daemon = subprocess.Popen([sys.executable, str(PROJECT / "training_daemon.py"), "run", "--root", str(root),
                               "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        # The daemon is ready once it has written its first status.json (after the start-up sweep and scan).
        wait_until(lambda: (root / "status.json").exists(), 120, "the daemon to start")
        result["daemon_start_to_ready_s"] = round(time.time() - t_start, 2)
        for n in range(1, args.jobs + 1):
            time.sleep(args.idle)
            result["jobs"].append(run_one_job(root, args, tail, n, baseline))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
    result["ok"] = all(j["ok"] for j in result["jobs"])
    result["daemon_stderr_tail"] = daemon.stderr.read()[-2000:] if daemon.stderr else ""
    latest = root / "checkpoints/default/latest/metadata.json"
    if latest.exists():
        meta = json.loads(latest.read_text())
        result["metadata"] = {k: meta.get(k) for k in ("version", "device", "peak_gpu_mem_gib", "training_seconds",
                                                       "steps", "tokens_trained", "first_train_loss",
                                                       "final_train_loss", "eval_loss", "plan", "libraries")}
    if questions and result["ok"]:
        result["after"] = ask_all(root, config, questions, "default")
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
