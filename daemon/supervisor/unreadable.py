"""A job folder whose job.json cannot be read: the stand-in every reader shows, and the manifest the daemon
rebuilds for it when it sets the job aside in queue/failed/.

Nothing that lists jobs may leave such a folder out (it holds a user's bytes). A reader shows a stand-in; only
the daemon, which owns every state change, moves the folder. It moves it to failed/ whatever state it was in:
the job's history (attempts, errors) was in the lost manifest, so running it again unasked could loop on a
job that crashes the daemon. The rebuilt manifest holds only what is unambiguous: the id (the folder's name),
the input's sha256 and size (hashed from the folder), and the adapter and file name from the daemon's own
record of taking that very file (events.jsonl, or a published version's metadata.json naming this job and
these bytes). Without such a record they stay unknown and `retry` refuses the job, rather than guess an
adapter; the input is still there to drop again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from daemon.paths import Layout
from daemon.supervisor.job import INPUT, MANIFEST, UNKNOWN, Job, JobStatus
from daemon.timefmt import now_iso

# The unreadable manifest is kept beside the rebuilt one, for whoever wants to look at what was lost.
KEPT_MANIFEST = MANIFEST + ".unreadable"
# The intake's events that name a taken file's job, adapter, file name and bytes.
_CLAIM_EVENTS = (b'"job_queued"', b'"duplicate"', b'"file_rejected"')


def stand_in(job_id: int, state: JobStatus, reason: str) -> Job:
    """What a reader shows for a folder whose manifest cannot be read (never saved)."""
    why = f"{reason}; the daemon sets this job aside in queue/failed/ with its input intact"
    return Job(id=job_id, adapter=UNKNOWN, original_name=UNKNOWN, state=state, error=why, note=why,
               unreadable=reason)


def rebuild(layout: Layout, folder: Path, job: Job) -> Job:
    """The failed job to file the stand-in `job` under: what the folder and the daemon's records say of it."""
    sha256, size = _input_digest(folder / INPUT)
    out = Job(id=job.id, adapter=UNKNOWN, original_name=UNKNOWN, sha256=sha256, size=size,
              state=JobStatus.FAILED, finished_at=now_iso())
    source = _claim_record(layout, job.id, sha256)
    version = _published(layout, job.id, sha256) if sha256 is not None else None
    if source is None and version is not None:
        source = {"adapter": version["adapter"], "file": version.get("source_file")}
    if source is not None and isinstance(source.get("adapter"), str) and isinstance(source.get("file"), str):
        out.adapter, out.original_name = source["adapter"], source["file"]
    if version is not None and version.get("adapter") == out.adapter:
        out.version = version.get("version")
    if out.adapter == UNKNOWN:
        detail = f"its adapter and file name are unknown: drop {folder.name}/{INPUT} into the inbox again to train it"
    else:
        detail = (f"adapter {out.adapter} and file {out.original_name} rebuilt from the daemon's records; its "
                  f"earlier attempts are unknown; `training-daemon retry {out.id}` queues it again")
    if out.version is not None:
        detail += f"; the version it published ({out.adapter} v{out.version}) is untouched"
    out.error = f"job.json could not be read ({job.unreadable}); set aside with its input intact: {detail}"
    return out


def _input_digest(path: Path) -> tuple[str | None, int | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, None  # no input.jsonl (a symlink job keeps input.symlink): nothing to hash
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, None
        digest, size = hashlib.sha256(), 0
        while block := os.read(fd, 1 << 20):
            digest.update(block)
            size += len(block)
        return digest.hexdigest(), size
    finally:
        os.close(fd)


def _claim_record(layout: Layout, job_id: int, sha256: str | None) -> dict | None:
    """The intake's event for taking this job's file, if it names these very bytes."""
    # logrotate's first copy too (a compressed older one is not worth reading for this)
    for path in (layout.events, layout.events.with_name(layout.events.name + ".1")):
        try:
            with open(path, "rb") as f:
                for line in f:
                    if not any(kind in line for kind in _CLAIM_EVENTS):
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and event.get("job_id") == job_id and event.get("sha256") == sha256:
                        return event
        except OSError:
            continue
    return None


def _published(layout: Layout, job_id: int, sha256: str) -> dict | None:
    """A version's metadata naming this job and these bytes (a done job whose manifest was lost)."""
    for meta_path in layout.checkpoints.glob("*/v*/metadata.json"):
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("job_id") == job_id and meta.get("source_sha256") == sha256:
            return {**meta, "adapter": meta_path.parent.parent.name,
                    "version": int(meta_path.parent.name[1:]) if meta_path.parent.name[1:].isdigit() else None}
    return None
