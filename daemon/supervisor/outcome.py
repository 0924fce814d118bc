"""What a trainer child's exit means for its job."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from daemon import protocol


@dataclass
class Outcome:
    kind: str  # done | stopped | interrupted | disk_full | out_of_memory | bad_input | bad_config | failed | cancelled
    error: str | None = None
    version: int | None = None
    path: str | None = None

    @property
    def first_line(self) -> str:
        return (self.error or "").strip().splitlines()[0] if self.error else self.kind


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_exit(rc: int, job_dir: Path, *, stop_requested: bool, cancelled: bool) -> Outcome:
    if cancelled:
        return Outcome("cancelled", "cancelled by user")
    if rc == protocol.DONE:
        result = _read(job_dir / "result.json")
        if "version" in result:
            return Outcome("done", version=result["version"], path=result.get("path"))
        return Outcome("failed", "trainer exited 0 without result.json")
    err = _read(job_dir / "error.json")
    message = err.get("message") or ""
    if err.get("traceback") and err["traceback"].strip() != "NoneType: None":
        message = f"{message}\n{err['traceback']}".strip()
    if rc == protocol.STOPPED:
        return Outcome("stopped", "stopped on request after a checkpoint; it resumes from there")
    if rc < 0 and stop_requested:
        return Outcome("cold_stopped", "the trainer was killed by a cold stop; it resumes from its last checkpoint")
    if rc == protocol.BAD_INPUT:
        return Outcome("bad_input", message or "invalid input")
    if rc == protocol.OUT_OF_MEMORY:
        return Outcome("out_of_memory", message or "out of memory")
    if rc == protocol.DISK_FULL:
        return Outcome("disk_full", message or "disk full")
    if rc < 0:
        return Outcome("failed", f"the trainer was killed by signal {-rc}" + (f"\n{message}" if message else "")
                       + f"\n(see {job_dir.name}/trainer.log)")
    return Outcome("failed", message or f"the trainer exited with status {rc} (see {job_dir.name}/trainer.log)")


def fmt_eta(seconds) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
