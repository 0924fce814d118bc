"""Replay against forgetting: in continue mode a share of the examples comes from the adapter's earlier files.

The candidates are the training examples (never the held-out ones, which are the eval pool's) of the files the
promoted lineage was trained on: the parent version, its parent, and so on, through each version's metadata
(job_id, source_sha256, eval_lines) to the job's own copy, queue/done/j<id>/input.jsonl. They are read there, by
reference, and checked against the sha256 recorded when they trained: a file gone or changed is a note, never a
failure. With replay_fraction f and n new examples, k = round(f / (1 - f) * n) are drawn with the job's seed and
appended before the batches are planned, so f of the examples (on average, of each step's too) are replayed and a
resumed run plans exactly the same batches.

Reading the lineage's files is the costly part (every file validated and tokenized again, more with every
version), and the parent is known only after the GPU go. So an early trainer reads ahead while it waits
(`read_ahead`: the lineage of the newest version there is then) into a cache by path and sha256, and `choose`,
after the go, reads only what was published since.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from daemon import durable, versions
from daemon.paths import Layout

MAX_FILES = 100  # the newest files of a long lineage: replay must not read an adapter's whole history every job


@dataclass
class Replay:
    fraction: float
    examples: list = field(default_factory=list)  # TokenizedExample, appended to the training examples
    files: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_metadata(self) -> dict:
        return {"fraction": self.fraction, "examples": len(self.examples), "files": self.files, "notes": self.notes}


_read: dict[tuple[str, str], object] = {}  # (path, sha256) -> its validation report, this process's job config


def _validated(path: Path, sha: str | None, tokenizer, cfg, base_dir: Path):
    """validate_for_config of a lineage file, once per process for a file whose sha256 was checked."""
    from daemon.trainer.data import validate_for_config

    key = (str(path), sha) if sha else None
    if key in _read:
        return _read[key]
    report = validate_for_config(path, tokenizer, cfg, base_dir=base_dir, keep_examples=True)
    if key is not None:
        _read[key] = report
    return report


def read_ahead(cfg, layout: Layout, adapter_dir: Path, tokenizer, base_dir: Path, stop=lambda: False) -> int:
    """Validate the files of the newest version's lineage into the cache choose() reads (before the go: the
    parent is not known yet, but it is that version or one published after it). Never raises: what fails here
    fails again, with its note, in choose(). Returns how many files it read."""
    if cfg.versions.replay_fraction <= 0 or cfg.training.mode != "continue":
        return 0
    read = 0
    try:
        newest = versions.latest_version(adapter_dir)
        for meta in lineage(adapter_dir, newest, []):
            if stop():
                break
            job_id, sha = meta.get("job_id"), meta.get("source_sha256")
            path = done_input(layout, job_id) if isinstance(job_id, int) else None
            if path is None or not sha or not path.is_file() or durable.sha256_file(path) != sha:
                continue
            _validated(path, sha, tokenizer, cfg, base_dir)
            read += 1
    except Exception:
        pass
    return read


def forget() -> None:
    """Drop the cache of validated lineage files (once choose() has drawn from it)."""
    _read.clear()


def done_input(layout: Layout, job_id: int) -> Path:
    """Where a finished job keeps its file: the spool names job folders j<id, 6 digits> (supervisor/job.py)."""
    return layout.state_dir("done") / f"j{job_id:06d}" / "input.jsonl"


def lineage(adapter_dir: Path, parent: int | None, notes: list[str]) -> list[dict]:
    """The metadata of `parent` and its ancestors, newest first (at most MAX_FILES)."""
    out, seen, v = [], set(), parent
    while v is not None and v not in seen and len(out) < MAX_FILES:
        seen.add(v)
        try:
            meta = versions.read_metadata(adapter_dir, v)
        except (OSError, ValueError) as e:
            notes.append(f"v{v}'s metadata is unreadable ({type(e).__name__}): its lineage is not replayed")
            break
        out.append(meta)
        v = meta.get("parent_version")
    return out


def choose(cfg, layout: Layout, adapter_dir: Path, parent: int | None, n_train: int, tokenizer,
           base_dir: Path, preference: bool = False) -> Replay:
    """The replayed examples for a job of n_train examples training on `parent` (continue mode). A preference
    (DPO) job replays nothing, and an SFT job never replays a preference file: pairs are not SFT examples."""
    f = cfg.versions.replay_fraction
    replay = Replay(f)
    if f <= 0 or parent is None or cfg.training.mode != "continue" or n_train == 0:
        return replay
    if preference:
        replay.notes.append("a preference file replays nothing (the earlier files hold no preference pairs)")
        return replay
    candidates: list = []  # (file index, example)
    for meta in lineage(adapter_dir, parent, replay.notes):
        job_id, name, sha = meta.get("job_id"), meta.get("source_file"), meta.get("source_sha256")
        path = done_input(layout, job_id) if isinstance(job_id, int) else None
        if path is None or not path.is_file():
            replay.notes.append(f"job {job_id}'s file ({name}, v{meta.get('version')}) is no longer in queue/done: "
                                "not replayed")
            continue
        if sha and durable.sha256_file(path) != sha:
            replay.notes.append(f"job {job_id}'s file ({name}) changed since v{meta.get('version')} trained on it: "
                                "not replayed")
            continue
        report = _validated(path, sha, tokenizer, cfg, base_dir)
        if report.format == "preference":
            replay.notes.append(f"job {job_id}'s file ({name}) holds preference pairs: not replayed")
            continue
        if not report.ok:
            replay.notes.append(f"job {job_id}'s file ({name}) does not validate with this job's settings: "
                                "not replayed")
            continue
        held = meta.get("eval_lines")
        if held is None:
            replay.notes.append(f"v{meta.get('version')} records no held-out lines: all of {name} may be replayed")
        held = set(held or [])
        index = len(replay.files)
        replay.files.append({"job_id": job_id, "source_file": name, "sha256": sha, "examples": 0})
        candidates.extend((index, ex) for ex in report.examples_list if ex.line not in held)
    if not candidates:
        if not replay.notes:
            replay.notes.append("no earlier examples to replay")
        replay.files = []
        return replay
    k = round(f / (1 - f) * n_train)
    rng = random.Random(cfg.training.seed)
    # Whole passes over the candidates first when they are fewer than k (a short earlier file is repeated, as
    # extra epochs would), then a sample of the rest: each candidate at most once more than any other.
    chosen = candidates * (k // len(candidates)) + rng.sample(candidates, k % len(candidates))
    for index, ex in chosen:
        replay.files[index]["examples"] += 1
        replay.examples.append(ex)
    replay.files = [row for row in replay.files if row["examples"]]
    return replay
