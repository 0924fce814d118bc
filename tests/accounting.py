"""The reliability suite's bookkeeping: what a test dropped, and where every byte of it ended up.

`Inbox` drops files the way helpers.drop does and remembers their bytes; `account()` then checks the
promise of docs/reliability.md for each of them: it ended exactly once in queue/done or queue/failed (with a
reason), its stored input is byte-identical, no job sits in two states, no job published two versions, and
no trainer process of the root is left alive. Trainer processes are found by their command line
(`daemon.trainer.main ... --root ROOT`), the same way `ps` would show them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import drop, events, wait_for

# Spelled out on purpose: the accounting reads the disk itself rather than trust the spool it checks.
STATES = ("pending", "running", "done", "failed")


@dataclass
class Dropped:
    name: str
    data: bytes | None  # None for a symlink: it has no bytes of its own
    adapter: str = "default"
    link_target: str | None = None

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


class Inbox:
    """Drops files into root/inbox and remembers each one for account()."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[Dropped] = []

    def drop(self, name: str, content: list[str] | bytes, adapter: str | None = None) -> Path:
        data = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode()
        path = drop(self.root, name, data, adapter)
        self.files.append(Dropped(name, data, adapter or "default"))
        return path

    def symlink(self, name: str, target: Path) -> Path:
        path = self.root / "inbox" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        self.files.append(Dropped(name, None, link_target=str(target)))
        return path


def account(root: Path, inbox: Inbox, *, expect: dict[str, str] | None = None,
            reasons: dict[str, str] | None = None) -> dict[str, dict]:
    """Assert every dropped file's fate; returns {name: job} (the last job, for a name dropped twice).

    expect: name -> the folder it must be in (default: done or failed).
    reasons: name -> text the failed job's error must contain.
    """
    expect, reasons = expect or {}, reasons or {}
    jobs = _jobs_once_each(root)
    assert not list((root / "queue").glob("*/.claim-*")), "a half-made claim was left behind"
    versions = _published_job_ids(root)
    assert len(versions) == len(set(versions)), f"a job published two versions: {sorted(versions)}"

    unmatched = list(jobs)
    fates: dict[str, dict] = {}
    for f in inbox.files:
        mine = [j for j in unmatched if j["original_name"] == f.name and j["adapter"] == f.adapter
                and j.get("sha256") == f.sha256]
        assert mine, f"{f.name!r} ({f.adapter}) has no job: lost. Jobs: {[j['original_name'] for j in jobs]}"
        job = mine[0]
        unmatched.remove(job)
        fates[f.name] = job
        folder = Path(job["dir"])
        wanted = expect.get(f.name)
        if wanted:
            assert job["folder"] == wanted, f"{f.name!r} is {job['folder']}, expected {wanted}: {job.get('error')}"
        else:
            assert job["folder"] in ("done", "failed"), f"{f.name!r} ended in {job['folder']}"
        if job["folder"] == "failed":
            assert job.get("error"), f"{f.name!r} failed without saying why"
            if f.name in reasons:
                assert reasons[f.name] in job["error"], f"{f.name!r}: {reasons[f.name]!r} not in {job['error']!r}"
        if job["folder"] == "done" and job.get("duplicate_of") is None:
            meta = json.loads((root / "checkpoints" / f.adapter / f"v{job['version']}" / "metadata.json").read_text())
            assert (meta["job_id"], meta["source_sha256"]) == (job["id"], f.sha256)
        if f.data is None:
            assert os.readlink(folder / "input.symlink") == f.link_target
            assert not os.path.lexists(folder / "input.jsonl")
        else:
            assert (folder / "input.jsonl").read_bytes() == f.data, f"{f.name!r}: stored bytes differ"
        assert not os.path.lexists(_inbox_path(root, f)), f"{f.name!r} is still in the inbox as well"
    assert not unmatched, f"jobs nobody dropped: {[j['original_name'] for j in unmatched]}"
    wait_for(lambda: not trainer_pids(root), timeout=10, what="every trainer process to exit")
    return fates


def _jobs_once_each(root: Path) -> list[dict]:
    jobs, where = [], {}
    for state in STATES:
        folder = root / "queue" / state
        for d in sorted(folder.iterdir()) if folder.is_dir() else []:
            if d.name.startswith("j"):
                assert d.name not in where, f"job {d.name} is in {where[d.name]} and {state}"
                where[d.name] = state
                jobs.append({**json.loads((d / "job.json").read_text()), "folder": state, "dir": str(d)})
    return sorted(jobs, key=lambda j: j["id"])


def _published_job_ids(root: Path) -> list[int]:
    return [json.loads(m.read_text())["job_id"] for m in (root / "checkpoints").glob("*/v*/metadata.json")]


def _inbox_path(root: Path, f: Dropped) -> Path:
    return root / "inbox" / (f.adapter + "/" if f.adapter != "default" else "") / f.name


# ------------------------------------------------------------------ processes
def trainer_pids(root: Path) -> list[int]:
    """Live trainer processes working for this root (zombies have no command line and do not count)."""
    want = str(root).encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"daemon.trainer.main" in a for a in args) and want in args:
            pids.append(int(entry.name))
    # A trainer's own short-lived children (fork, then exec: `uname -p` from platform.processor(), say) carry
    # its command line until their exec; they are not a second trainer.
    return [pid for pid in pids if _parent(pid) not in pids]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class TrainerWatch:
    """Samples the root's trainer processes in the background: `most` is the most ever seen at once."""

    def __init__(self, root: Path, interval: float = 0.05):
        self.root, self.interval, self.most = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(trainer_pids(self.root)))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TrainerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_event(root: Path, kind: str, timeout: float = 120, **fields) -> dict:
    """The first event of this kind whose fields match (a field given as a callable is a predicate)."""
    def match(e):
        return all(v(e.get(k)) if callable(v) else e.get(k) == v for k, v in fields.items())

    return wait_for(lambda: next((e for e in events(root, kind) if match(e)), None), timeout=timeout,
                    what=f"event {kind} {fields}")


def wait_ready(root: Path, daemon: subprocess.Popen) -> None:
    """Until this daemon watches the inbox: its first status.json is written after the watcher starts."""
    def ready():
        try:
            return json.loads((root / "status.json").read_text())["daemon"]["pid"] == daemon.pid
        except (OSError, ValueError, KeyError):
            return False

    wait_for(ready, timeout=60, what=f"daemon {daemon.pid} to be ready")


def resumes(root: Path) -> list[dict]:
    """The trainer's "resumed from a checkpoint" events (the daemon's un-pause is also called "resumed")."""
    return [e for e in events(root, "resumed") if "job_id" in e]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Signal the daemon and wait for it; its exit status. One that does not exit in time is asked for its
    threads' stacks (SIGUSR2, which the daemon answers on stderr: daemon.out under its root) for the failure."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR2)
        time.sleep(2)
        args = [str(a) for a in proc.args]
        out = Path(args[args.index("--root") + 1]) / "daemon.out" if "--root" in args else None
        tail = out.read_text(errors="replace")[-6000:] if out is not None and out.exists() else "(no daemon.out)"
        proc.kill()
        raise AssertionError(f"the daemon did not exit {timeout}s after signal {sig}; its stacks:\n{tail}") from None


def faults(*specs: dict) -> str:
    """TRAINING_DAEMON_FAULTS for the given faults."""
    return json.dumps(list(specs))


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path: to show a version was left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
