"""Published adapter versions: checkpoints/<adapter>/v<N>/ and the `latest` link.

A version folder is built under a temporary name and renamed into place only when complete, so a reader
never sees half a version; `latest` moves afterwards, and only when the promotion gate passed (which version
`latest` is, and moving it by hand: daemon/promotion.py). Its metadata.json records the size and
sha256 of every file beside it, so a version damaged later (a truncated copy, a disk error, a file deleted by
hand) is recognised before it is trained on or exported (`problems`, `newest_sound_version`). This module does
not import torch: the daemon and the CLI read versions too.
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
    """Numbers of the complete versions (those with a metadata.json), oldest first."""
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


def taken_numbers(adapter_dir: Path) -> list[int]:
    """Every number a `v<N>` entry holds, complete or not: a leftover half folder still owns its name."""
    if not adapter_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in adapter_dir.iterdir() if (m := VERSION.match(p.name)))


def next_version(adapter_dir: Path) -> int:
    found = taken_numbers(adapter_dir)
    return found[-1] + 1 if found else 1


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


def publish(adapter_dir: Path, staged: Path, metadata: dict, promote: bool = True) -> tuple[int, Path]:
    """Give the staged folder the next version number, atomically, and make it `latest` when `promote` (the
    promotion gate passed; a held version is published but `latest` stays). Under the adapter's `latest` lock
    (daemon/promotion.py), so a `promote` or `rollback` by hand never interleaves; the record of `latest` is made
    whole before the rename, so a crash after it never makes a held version `latest`. A version judged against
    an incumbent (metadata's promotion.incumbent_version) that is no longer `latest` is held: a promote or
    rollback done while the job trained or was judged is never undone by it."""
    from daemon import promotion

    files = file_digests(staged)
    for f in staged.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    with promotion.locked(adapter_dir):
        record, _ = promotion.prepared(adapter_dir)
        version = next_version(adapter_dir)
        metadata = {**metadata, "version": version, "files": files}
        if isinstance(metadata.get("promotion"), dict):  # only here is the number known, under the lock
            verdict = dict(metadata["promotion"])
            if promote and "incumbent_version" in verdict and verdict["incumbent_version"] != record["version"]:
                # judged against a `latest` a promote or rollback has moved since: that choice stands
                promote, verdict["decision"], verdict["reason"] = False, "held", moved_reason(
                    verdict["incumbent_version"], record)
            metadata["promotion"] = {**verdict, "latest_after": version if promote else record["version"]}
        durable.write_json(staged / "metadata.json", metadata)
        faults.check("version_write")  # staged and complete, not yet renamed into place
        final = adapter_dir / f"v{version}"
        durable.rename(staged, final)
        faults.check("published")  # in place, `latest` not yet moved and the job not yet done
        if promote:
            reason = (metadata.get("promotion") or {}).get("reason")
            promotion.move(adapter_dir, record, version, "gate", metadata.get("job_id"), reason)
    return version, final


def moved_reason(incumbent: int | None, record: dict) -> str:
    by = next((e.get("by") for e in reversed(record["history"]) if e["version"] == record["version"]), None)
    how = f" (by {by})" if by in ("promote", "rollback") else ""
    was, now = (f"v{n}" if n is not None else "none" for n in (incumbent, record["version"]))
    return f"latest moved from {was} to {now} during the job{how}: not promoted; promote it by hand if wanted"


def promoted_version(adapter_dir: Path) -> int | None:
    """The version `latest` is (checkpoints/<adapter>/latest.json, see daemon/promotion.py): what `continue`
    trains on and what is served; a held version is newer. Without a record: what its seed would say."""
    from daemon import promotion

    return promotion.promoted(adapter_dir)


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes": size, "sha256": hex}} of every file in a version folder but metadata.json."""
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": durable.sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder) != Path("metadata.json")}


# A version from before file digests were recorded is checked for the files a PEFT adapter cannot load without.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def problems(version_dir: Path, digests: bool = True) -> list[str]:
    """What is wrong with a published version folder, in plain words; empty when it is whole. `digests=False`
    checks names and sizes only: a look cheap enough for every request of the status page."""
    try:
        meta = json.loads((version_dir / "metadata.json").read_text())
    except FileNotFoundError:
        return ["no metadata.json: an incomplete version"]
    except (OSError, ValueError) as e:
        return [f"metadata.json is unreadable: {e}"]
    recorded = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return [f"{name} is missing" for name in ADAPTER_FILES if not (version_dir / name).is_file()]
    found = []
    for name, want in recorded.items():
        path = version_dir / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != want.get("bytes"):
            found.append(f"{name} has {path.stat().st_size} bytes, {want.get('bytes')} were published")
        elif digests and durable.sha256_file(path) != want.get("sha256"):
            found.append(f"{name} does not match the sha256 recorded when it was published")
    return found


def damaged_versions(adapter_dir: Path) -> dict[int, list[str]]:
    """{version: problems} of every `v<N>` folder that fails the quick check (names and sizes)."""
    found = {v: problems(adapter_dir / f"v{v}", digests=False) for v in taken_numbers(adapter_dir)
             if (adapter_dir / f"v{v}").is_dir()}
    return {v: p for v, p in found.items() if p}


def newest_sound_version(adapter_dir: Path, on_damaged) -> int | None:
    """The newest version folder that is whole; `on_damaged(version, problems)` hears of each newer one skipped
    (a `v<N>` folder without metadata.json included: a version is never renamed into place without one)."""
    for v in reversed(taken_numbers(adapter_dir)):
        path = adapter_dir / f"v{v}"
        if not path.is_dir():
            continue
        found = problems(path)
        if not found:
            return v
        on_damaged(v, found)
    return None


def repair_latest(adapter_dir: Path) -> list[str]:
    """After a crash: `latest` made to follow its record (latest.json), a promotion the crash left unrecorded
    recorded. What was repaired, in words (empty when nothing was)."""
    from daemon import promotion

    return promotion.repair(adapter_dir)


def clean_staging(adapter_dir: Path, skip_jobs: set[int] = frozenset()) -> None:
    """Staging folders a crash left. skip_jobs: jobs whose trainer may still be publishing (a re-attached Slurm
    job outlives the daemon): their `.tmp-job<id>-*` folders are theirs, not leftovers."""
    if adapter_dir.is_dir():
        for p in adapter_dir.iterdir():
            if p.name.startswith(".tmp-") and not any(p.name.startswith(f".tmp-job{j}-") for j in skip_jobs):
                shutil.rmtree(p, ignore_errors=True)
