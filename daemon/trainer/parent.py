"""Which version is "the adapter" when no number is named: what `latest` is, when that version is whole.

A continue-mode job trains on it, and `ask` / `export` use it. A version newer than `latest` was held by the
promotion gate (docs/trust.md) and is used only when named (ADAPTER@N). No torch here.
"""

from __future__ import annotations

from pathlib import Path

from daemon import promotion, versions


def promoted_sound_version(adapter_dir: Path, on_damaged) -> int | None:
    """What `latest` points at when it is whole, else the one a rollback would reach: the versions still under it
    in the record's chain of promotions (promotion.chain; never one rolled back from), newest first.
    `on_damaged(version, problems)` hears of each damaged one passed, a damaged (or half-made) folder above
    `latest` that is not in the chain included."""
    target = versions.promoted_version(adapter_dir)
    if target is None:
        return None
    order = [target]
    for v in reversed(promotion.chain(promotion.current_record(adapter_dir)["history"])):
        if v not in order:
            order.append(v)
    for v in reversed(versions.taken_numbers(adapter_dir)):  # held versions are not trained on: a word only
        if v > target and v not in order and (adapter_dir / f"v{v}").is_dir():
            if found := versions.problems(adapter_dir / f"v{v}", digests=False):
                on_damaged(v, found)
    for v in order:
        path = adapter_dir / f"v{v}"
        if not path.is_dir():
            continue
        if found := versions.problems(path):
            on_damaged(v, found)
            continue
        return v
    return None
