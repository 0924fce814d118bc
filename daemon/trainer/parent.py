"""Which version is "the adapter" when no number is named: what `latest` is, when that version is whole.

A continue-mode job trains on it, and `ask` / `export` use it. A version newer than `latest` was held by the
promotion gate (docs/trust.md) and is used only when named (ADAPTER@N). No torch here.
"""

from __future__ import annotations

from pathlib import Path

from daemon import durable, versions


def promoted_sound_version(adapter_dir: Path, on_damaged) -> int | None:
    """What `latest` points at when it is whole, else the newest whole version below it that was promoted (by the
    gate, by hand, or before there was a gate). `on_damaged(version, problems)` hears of each damaged one passed,
    a damaged (or half-made) folder above `latest` included."""
    target = versions.promoted_version(adapter_dir)
    if target is None:
        return None
    by_hand = promoted_by_record(adapter_dir)
    for v in reversed(versions.taken_numbers(adapter_dir)):
        path = adapter_dir / f"v{v}"
        if not path.is_dir():
            continue
        if v > target:  # held versions are not trained on; a damaged folder among them is still worth a word
            if found := versions.problems(path, digests=False):
                on_damaged(v, found)
            continue
        if found := versions.problems(path):
            on_damaged(v, found)
            continue
        if v == target or v in by_hand:
            return v
        try:
            decision = (versions.read_metadata(adapter_dir, v).get("promotion") or {}).get("decision")
        except (OSError, ValueError):
            continue
        if decision != "held":
            return v
    return None


def promoted_by_record(adapter_dir: Path) -> set[int]:
    """Versions the `latest` record (latest.json: its history) says were latest at some time."""
    record = durable.read_json(adapter_dir / "latest.json", default=None)
    history = record.get("history") if isinstance(record, dict) else None
    return {h["version"] for h in history or [] if isinstance(h, dict) and isinstance(h.get("version"), int)}
