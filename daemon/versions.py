"""Published adapter versions: checkpoints/<adapter>/v<N>/ and the `latest` link.

A version folder is built under a temporary name and renamed into place only when complete, so a reader
never sees half a version; `latest` is swapped atomically afterwards. This module does not import torch:
the daemon and the CLI read versions too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from daemon import durable, faults

VERSION = re.compile(r"^v(\d+)$")


def versions(adapter_dir: Path) -> list[int]:
    if not adapter_dir.is_dir():
        return []
    found = []
    for p in adapter_dir.iterdir():
        m = VERSION.match(p.name)
        if m and p.is_dir() and (p / "metadata.json").exists():
            found.append(int(m.group(1)))
    return sorted(found)


def latest_version(adapter_dir: Path) -> int | None:
    found = versions(adapter_dir)
    return found[-1] if found else None


def read_metadata(adapter_dir: Path, version: int) -> dict:
    return json.loads((adapter_dir / f"v{version}" / "metadata.json").read_text())


def find_version_of_job(adapter_dir: Path, job_id: int) -> int | None:
    """The version a job published, if it got that far (used to finish a job after a crash)."""
    for v in reversed(versions(adapter_dir)):
        try:
            if read_metadata(adapter_dir, v).get("job_id") == job_id:
                return v
        except (OSError, ValueError):
            continue
    return None


def staging_dir(adapter_dir: Path, job_id: int) -> Path:
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapter_dir / f".tmp-job{job_id}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(adapter_dir: Path, staged: Path, metadata: dict) -> tuple[int, Path]:
    """Give the staged folder the next version number, atomically, and point `latest` at it."""
    version = (latest_version(adapter_dir) or 0) + 1
    metadata = {**metadata, "version": version}
    durable.write_json(staged / "metadata.json", metadata)
    for f in staged.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    faults.check("version_write")  # staged and complete, not yet renamed into place
    final = adapter_dir / f"v{version}"
    durable.rename(staged, final)
    faults.check("published")  # in place, `latest` not yet swapped and the job not yet done
    durable.swap_symlink(adapter_dir / "latest", final.name)
    return version, final


def repair_latest(adapter_dir: Path) -> None:
    """After a crash between rename and link swap, point `latest` at the newest complete version."""
    newest = latest_version(adapter_dir)
    link = adapter_dir / "latest"
    if newest is None:
        return
    if not link.is_symlink() or os.readlink(link) != f"v{newest}":
        durable.swap_symlink(link, f"v{newest}")


def clean_staging(adapter_dir: Path) -> None:
    if adapter_dir.is_dir():
        for p in adapter_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
