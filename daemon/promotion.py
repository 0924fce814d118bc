"""Which version `latest` is, durably, and the operations that move it: the promotion gate's verdict at publish
(versions.publish), `training-daemon promote ADAPTER@vN` and `training-daemon rollback ADAPTER`.

The truth is checkpoints/<adapter>/latest.json: {"version": N, "history": [{"version", "at", "by", "job_id",
"reason"}]}, `by` one of gate, promote, rollback, repair. It is written (durably) before the `latest` symlink is
swapped, so a crash between the two leaves a record the link is repaired to follow (repair_latest), never the
other way round. Every change happens under an flock on checkpoints/<adapter>/.latest.lock, which the trainer's
publish and the CLI's commands share: a promote never interleaves with a publish of the same adapter.

An adapter from before the record was kept (no latest.json) keeps the old rule, every complete version became
`latest` when published: its record is seeded from that at the first change. A version whose metadata says the
gate promoted it but whose record entry a crash prevented (between the rename into place and the record) is
recorded by the next repair or change. A version's own gate verdict is in its metadata.json ("promotion");
manual moves are only here, since a published version's files are never rewritten. No torch here.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon import durable
from daemon import versions as v
from daemon.flock import lock_within
from daemon.paths import UserError, check_adapter_name
from daemon.timefmt import now_iso

RECORD = "latest.json"
LOCK = ".latest.lock"
LINK = "latest"
HISTORY_KEPT = 1000  # entries: enough to roll back through any real history, bounded for a years-old adapter
# A CLI command waits this long for a publish in progress (renaming a large adapter takes a moment, not minutes).
COMMAND_LOCK_WAIT_SECONDS = 60.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_record(adapter_dir: Path) -> dict | None:
    """latest.json, or None for an adapter without one (or one that does not hold a record: edited by hand)."""
    rec = durable.read_json(Path(adapter_dir) / RECORD)
    if not isinstance(rec, dict) or not isinstance(rec.get("history"), list):
        return None
    if rec.get("version") is not None and not _is_int(rec["version"]):
        return None
    rec["history"] = [e for e in rec["history"] if isinstance(e, dict) and _is_int(e.get("version"))]
    return rec


@contextmanager
def locked(adapter_dir: Path, wait: float | None = None) -> Iterator[None]:
    """The adapter's `latest` lock. wait: seconds to wait before a clean UserError (None: as long as it takes,
    for the trainer, which must publish whatever a command is doing)."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(adapter_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, durable.FILE_MODE)
    try:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            lock_within(fd, wait, f"adapter {adapter_dir.name}: a version is being published right now "
                        f"(checkpoints/{adapter_dir.name}/{LOCK} held for {wait:.0f}s); try again in a moment",
                        poll=0.1)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ what a version's metadata says
def gate_verdict(meta: dict) -> dict:
    """{"decision": "promoted"|"held", "reason", "latest_after", "incumbent"} of a version's metadata; a version
    from before the gate (no "promotion") counts as promoted, as every version then was."""
    p = meta.get("promotion") if isinstance(meta.get("promotion"), dict) else {}
    decision = p.get("decision") if p.get("decision") in ("promoted", "held") else "promoted"
    return {"decision": decision, "reason": p.get("reason"), "latest_after": p.get("latest_after"),
            "incumbent": p.get("incumbent_version"), "judged": bool(p)}


_META_CACHE: dict[str, tuple[tuple, dict]] = {}
_KEPT_FIELDS = ("job_id", "source_file", "finished_at", "promotion", "judgement", "base_model_fingerprint",
                "base_model_path")


def metadata_summary(adapter_dir: Path, version: int) -> dict | None:
    """The few metadata fields the listings need, cached by the file's identity: a published metadata.json is
    written once, and the status page asks many times a minute. None when missing or unreadable."""
    path = Path(adapter_dir) / f"v{version}" / "metadata.json"
    try:
        st = path.stat()
    except OSError:
        return None
    key, ident = str(path), (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _META_CACHE.get(key)
    if hit and hit[0] == ident:
        return hit[1]
    meta = durable.read_json(path)
    if not isinstance(meta, dict):
        return None
    summary = {k: meta.get(k) for k in _KEPT_FIELDS}
    _META_CACHE[key] = (ident, summary)
    return summary


# ------------------------------------------------------------------ the record
def chain(history: list[dict]) -> list[int]:
    """The promoted versions still "under" the current one, oldest first: each promotion stacks a version, a
    rollback unstacks down to its target (so two rollbacks go two versions back, not back and forth)."""
    stack: list[int] = []
    for entry in history:
        if entry.get("by") == "rollback":
            while stack and stack[-1] != entry["version"]:
                stack.pop()
            if not stack:
                stack.append(entry["version"])
        else:
            stack.append(entry["version"])
    return stack


def promoted(adapter_dir: Path) -> int | None:
    """The version `latest` is: the record's, when its folder is complete; without a record, the one its seed
    would name (_seed); with the recorded folder gone, the one repair would choose."""
    adapter_dir = Path(adapter_dir)
    rec = read_record(adapter_dir)
    if rec is None:
        return _seed(adapter_dir)[0]["version"]
    if rec["version"] is None or _complete(adapter_dir, rec["version"]):
        return rec["version"]
    return _present_below(adapter_dir, rec)


def _complete(adapter_dir: Path, version: int) -> bool:
    return (adapter_dir / f"v{version}" / "metadata.json").is_file()


def _present_below(adapter_dir: Path, rec: dict) -> int | None:
    for version in reversed(chain(rec["history"])):
        if version != rec["version"] and _complete(adapter_dir, version):
            return version
    return None


def _entry(version: int, by: str, job_id, reason: str | None) -> dict:
    return {"version": version, "at": now_iso(), "by": by, "job_id": job_id, "reason": reason}


def current_record(adapter_dir: Path) -> dict:
    """latest.json, or without one the record its first change would seed (nothing written)."""
    rec = read_record(Path(adapter_dir))
    return rec if rec is not None else _seed(Path(adapter_dir))[0]


def _linked(adapter_dir: Path) -> int | None:
    """The version the `latest` link names, when it names a whole one (names and sizes)."""
    link = adapter_dir / LINK
    m = v.VERSION.match(os.readlink(link)) if link.is_symlink() else None
    if m is None or not _complete(adapter_dir, int(m.group(1))) or v.problems(adapter_dir / m.group(0), False):
        return None
    return int(m.group(1))


def _seed(adapter_dir: Path) -> tuple[dict, str]:
    """The record of an adapter without one (from before records, or latest.json lost), and why it names its
    version. Every complete version the gate did not hold was `latest` once; the link says which is now (a
    rollback or a promote by hand may have moved it there), unless a newer version is from before the gate
    (each of those became `latest` when published: an older daemon's crash before the link's swap)."""
    metas = {n: metadata_summary(adapter_dir, n) for n in v.versions(adapter_dir)}
    found = [n for n, meta in metas.items() if gate_verdict(meta or {})["decision"] != "held"]
    current, why = _linked(adapter_dir), "what the latest link points at"
    if current is None or any(n > current and meta is not None and not gate_verdict(meta)["judged"]
                              for n, meta in metas.items()):
        current, why = (found[-1] if found else None), "the newest complete version"
    history = []
    for version in [n for n in found if n != current] + ([current] if current is not None else []):
        meta = metas.get(version) or {}
        history.append({**_entry(version, "repair", meta.get("job_id"),
                                 "published before latest.json was kept"), "at": meta.get("finished_at")})
    return {"version": current, "history": history}, why


def prepared(adapter_dir: Path) -> tuple[dict, list[str]]:
    """Under the lock: the record as it must be before any change, written if it was not (seeded for an older
    adapter, a promotion a crash left unrecorded caught up, a recorded version deleted by hand replaced), and
    what was repaired, in words."""
    rec, notes, changed = read_record(adapter_dir), [], False
    if rec is None:
        (rec, why), changed = _seed(adapter_dir), True
        if rec["history"]:
            notes.append(f"latest.json started: latest is v{rec['version']} ({why})")
    known = max((e["version"] for e in rec["history"]), default=0)
    for version in v.versions(adapter_dir):
        meta = metadata_summary(adapter_dir, version)
        if version <= known or meta is None or gate_verdict(meta)["decision"] != "promoted":
            continue
        rec["history"].append(_entry(version, "repair", meta.get("job_id"),
                                     "promoted by the gate; recorded after a crash"))
        rec["version"], changed = version, True
        notes.append(f"v{version} was promoted when published; its record was cut short by a crash: latest is "
                     f"v{version}")
    if rec["version"] is not None and not _complete(adapter_dir, rec["version"]):
        below = _present_below(adapter_dir, rec)
        if below is not None:
            notes.append(f"latest was v{rec['version']}, which is gone: latest is v{below}")
            rec["history"].append(_entry(below, "repair", None, f"v{rec['version']} is gone"))
            rec["version"], changed = below, True
    if changed:
        _write(adapter_dir, rec)
    return rec, notes


def _write(adapter_dir: Path, rec: dict) -> None:
    rec["history"] = rec["history"][-HISTORY_KEPT:]
    durable.write_json(adapter_dir / RECORD, rec)


def _follow(adapter_dir: Path, rec: dict) -> bool:
    """The symlink made to agree with the record; True if it had to change."""
    link = adapter_dir / LINK
    if rec["version"] is None or not _complete(adapter_dir, rec["version"]):
        return False
    want = f"v{rec['version']}"
    if link.is_symlink() and os.readlink(link) == want:
        return False
    durable.swap_symlink(link, want)
    return True


def move(adapter_dir: Path, rec: dict, version: int, by: str, job_id=None, reason: str | None = None) -> None:
    """Under the lock: `latest` becomes `version`, the record first, then the link."""
    rec["history"].append(_entry(version, by, job_id, reason))
    rec["version"] = version
    _write(adapter_dir, rec)
    _follow(adapter_dir, rec)


def repair(adapter_dir: Path) -> list[str]:
    """The start-up sweep's and a recovering trainer's repair: the record made whole, the link made to follow
    it. What was repaired, in words (empty when nothing was)."""
    adapter_dir = Path(adapter_dir)
    if not v.versions(adapter_dir) and read_record(adapter_dir) is None:
        return []
    with locked(adapter_dir):
        rec, notes = prepared(adapter_dir)
        was = os.readlink(adapter_dir / LINK) if (adapter_dir / LINK).is_symlink() else None
        if _follow(adapter_dir, rec) and not notes:
            notes.append(f"the latest link pointed at {was or 'nothing'}; latest.json says v{rec['version']}")
    return notes


# ------------------------------------------------------------------ by hand
def parse_spec(spec: str, need_version: bool) -> tuple[str, int | None]:
    """ADAPTER or ADAPTER@N / ADAPTER@vN -> (adapter, N)."""
    name, at, version = spec.partition("@")
    check_adapter_name(name)
    if at and not (version.removeprefix("v").isdigit() and version.removeprefix("v").isascii()):
        raise UserError(f"bad version in {spec!r}: use ADAPTER@N (e.g. default@3 or default@v3)")
    if need_version and not at:
        raise UserError(f"name a version: {spec}@N (e.g. {spec}@3)")
    return name, int(version.removeprefix("v")) if at else None


def _version_job(adapter_dir: Path, version: int):
    return (metadata_summary(adapter_dir, version) or {}).get("job_id")


def promote(checkpoints: Path, spec: str, check_base=None) -> dict:
    """`latest` of ADAPTER moved to version N by hand: the version must be whole and trained on the base model
    the current latest was (check_base(meta, label) raises UserError if its base folder now holds another model).
    Returns the event fields: adapter, version, was, job_id, reason, message."""
    name, version = parse_spec(spec, need_version=True)
    adapter_dir = Path(checkpoints) / name
    path = adapter_dir / f"v{version}"
    if not path.is_dir():
        raise UserError(f"no published version {name}@{version} under {checkpoints}")
    with locked(adapter_dir, COMMAND_LOCK_WAIT_SECONDS):
        found = v.problems(path)
        if found:
            raise UserError(f"version {name}@{version} is damaged and cannot be promoted: {'; '.join(found)}")
        rec, _ = prepared(adapter_dir)
        was = rec["version"]
        if was == version:
            return {"adapter": name, "version": version, "was": was, "changed": False,
                    "message": f"{name}: latest is already v{version}; nothing to do"}
        meta = v.read_metadata(adapter_dir, version)
        current = (metadata_summary(adapter_dir, was) or {}) if was is not None else {}
        theirs, ours = meta.get("base_model_fingerprint"), current.get("base_model_fingerprint")
        if theirs and ours and theirs != ours:
            raise UserError(f"{name}@{version} was trained on another base model than latest v{was} (base "
                            f"fingerprint {theirs[:12]}, latest's {ours[:12]}): not promoted")
        if check_base is not None:
            check_base(meta, f"{name}@{version}")
        verdict = gate_verdict(meta)
        reason = "by hand" + (f"; the gate had held it: {verdict['reason']}" if verdict["decision"] == "held"
                              and verdict["reason"] else "")
        move(adapter_dir, rec, version, "promote", meta.get("job_id"), reason)
    return {"adapter": name, "version": version, "was": was, "job_id": meta.get("job_id"), "reason": reason,
            "changed": True, "message": f"{name}: latest is now v{version} (was "
                                        f"{'v' + str(was) if was is not None else 'none'}), promoted by hand"}


def rollback(checkpoints: Path, adapter: str) -> dict:
    """`latest` of ADAPTER moved back to the version promoted before the current one (skipping any that is gone
    or damaged since). UserError when there is none."""
    name, _ = parse_spec(adapter, need_version=False)
    adapter_dir = Path(checkpoints) / name
    if not v.versions(adapter_dir):
        raise UserError(f"adapter {name} has no published version under {checkpoints}")
    with locked(adapter_dir, COMMAND_LOCK_WAIT_SECONDS):
        rec, _ = prepared(adapter_dir)
        was, skipped, target = rec["version"], [], None
        for version in reversed(chain(rec["history"])):
            if version == was:
                continue
            found = v.problems(adapter_dir / f"v{version}") if (adapter_dir / f"v{version}").is_dir() else ["gone"]
            if not found:
                target = version
                break
            skipped.append(f"v{version} ({'; '.join(found)})")
        if target is None:
            why = f"; skipped: {', '.join(skipped)}" if skipped else ""
            raise UserError(f"{name}: nothing to roll back to: no version was latest before "
                            f"{'v' + str(was) if was is not None else 'now'}{why}")
        reason = f"rolled back from v{was}" + (f", skipping {', '.join(skipped)}" if skipped else "")
        move(adapter_dir, rec, target, "rollback", _version_job(adapter_dir, target), reason)
    return {"adapter": name, "version": target, "was": was, "job_id": _version_job(adapter_dir, target),
            "reason": reason, "changed": True,
            "message": f"{name}: rolled back to v{target} (was v{was})" + (f"; skipped {', '.join(skipped)}"
                                                                          if skipped else "")}
