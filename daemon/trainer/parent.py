"""Which version is "the adapter" when no number is named: what `latest` is, when that version is whole; and
which version a job trains on (choose_parent: the trainer's, attempt by attempt).

A continue-mode job trains on it, and `ask` / `export` use it. A version newer than `latest` was held by the
promotion gate (docs/trust.md) and is used only when named (ADAPTER@N). No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon import promotion, versions
from daemon.protocol import Event
from daemon.trainer.process import emit


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


def choose_parent(attempt, cfg, base_dir: Path) -> int | None:
    """The version to train on top of: the one an interrupted attempt's checkpoints started from; else, in mode
    continue, the version `latest` points at (never a newer, held one), or when that is damaged the newest sound
    version that was promoted (each damaged one is skipped, said so), when it was trained on the same base model,
    by path and by content; else none (the base). A version from before base fingerprints were recorded is
    trusted on its path alone."""
    from daemon.trainer import checkpoint  # here, not at the top: `ask` and `export` import this module

    found = checkpoint.complete_checkpoints(attempt.job_dir / "resume")
    resumed_parent = json.loads((found[0] / "progress.json").read_text()).get("parent_version") if found else None
    if resumed_parent is not None:
        return resumed_parent
    if cfg.training.mode != "continue":
        return None

    def note(message: str, level: str = "info") -> None:
        attempt.parent_notes.append(message)
        emit({"event": Event.LOG, "message": message, "level": level})

    latest = promoted_sound_version(attempt.adapter_dir, lambda v, problems: note(
        f"version v{v} of {attempt.job['adapter']} is damaged ({'; '.join(problems)}): skipped", "warning"))
    if latest is None:
        return None
    meta = versions.read_metadata(attempt.adapter_dir, latest)
    if meta.get("base_model_path") and Path(meta["base_model_path"]) != base_dir:
        note(f"latest version v{latest} was trained on {meta['base_model_path']}, not {base_dir}: "
             "training from the base model instead")
        return None
    if meta.get("base_model_fingerprint") not in (None, attempt.base_fingerprint):
        note(f"latest version v{latest} was trained on another model than the one now at {base_dir} (base "
             f"fingerprint {meta['base_model_fingerprint'][:12]}, now {attempt.base_fingerprint[:12]}): "
             "training from the base model instead")
        return None
    return latest
