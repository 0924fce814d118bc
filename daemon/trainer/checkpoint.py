"""Self-describing resume checkpoints, written atomically and verified before use.

A checkpoint is a folder `resume/step-000120/` holding the trainable (LoRA) weights, the optimizer and
scheduler state, every RNG state, the progress record (epoch, data position, loss history) and the config.
It is built under a temporary name and renamed into place only after a `COMPLETE` manifest listing the
sha256 of every file has been written and fsynced; a folder without a valid manifest is never loaded
(the HF Trainer's "highest-numbered folder wins" can resume from a half-written one).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from daemon import durable, faults
from daemon import protocol
from daemon.trainer import sharding
from daemon.trainer.distributed import World

MANIFEST = "COMPLETE"
PREFIX = "step-"


@dataclass
class Progress:
    """Where training stands; enough to continue exactly where a checkpoint left off."""

    epoch: int = 0
    micro_batch: int = 0  # index of the next micro-batch in this epoch's plan
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    tokens_seen: int = 0
    trainable_tokens_seen: int = 0
    train_seconds: float = 0.0
    losses: list = field(default_factory=list)  # [step, mean token loss]
    evals: list = field(default_factory=list)  # [step, eval loss]
    nonfinite_streak: int = 0
    parent_version: int | None = None
    examples_sha256: str | None = None  # examples_fingerprint of what trains: a resume must index the same plan

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_free_space(path: Path, floor_mb: int, need_bytes: int = 0) -> None:
    free = shutil.disk_usage(path).free
    if free - need_bytes < floor_mb * 1024 * 1024:
        raise protocol.DiskFull(
            f"only {free / 2**20:.0f} MiB free at {path}; the configured floor is {floor_mb} MiB "
            f"(limits.min_free_disk_mb) and this write needs about {need_bytes / 2**20:.0f} MiB"
        )


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The whole LoRA weights; a collective when they are sharded (FSDP): then every rank must call it."""
    return {n: sharding.full(p.detach()).to("cpu").contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save(resume_dir: Path, model, optimizer, scheduler, progress: Progress, config: dict,
         keep: int = 2, min_free_mb: int = 0, world: World | None = None) -> Path | None:
    """Write a checkpoint. With several ranks every rank calls it: sharded state is gathered, each rank's RNG
    state goes to rank 0, rank 0 writes (returning the path; the others get None) and all wait for it."""
    world = world or World()
    weights = trainable_state(model)
    optimizer_state = sharding.full_optimizer_state(optimizer)
    rng_states = world.gather(rng_state())
    if not world.is_main:
        world.barrier()
        return None
    path = _write(resume_dir, weights, optimizer_state, scheduler, rng_states, progress, config, keep, min_free_mb)
    world.barrier()
    return path


def _write(resume_dir: Path, weights, optimizer_state, scheduler, rng_states, progress: Progress, config: dict,
           keep: int, min_free_mb: int) -> Path:
    resume_dir.mkdir(parents=True, exist_ok=True)
    approx = sum(t.numel() * t.element_size() for t in weights.values()) * 3  # weights + Adam moments
    check_free_space(resume_dir, min_free_mb, approx)

    name = f"{PREFIX}{progress.step:06d}"
    final = resume_dir / name
    tmp = resume_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "adapter.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, state in enumerate(rng_states):
            torch.save(state, tmp / rng_file(rank))
        durable.write_json(tmp / "progress.json", asdict(progress))
        durable.write_json(tmp / "config.json", config)
        faults.check("checkpoint_write", step=progress.step)  # the files are there, the manifest is not yet
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = durable.sha256_file(f)
        durable.write_json(tmp / MANIFEST, {"step": progress.step, "files": files})
        if final.exists():  # a complete checkpoint of the same step (a retried save): replace it
            shutil.rmtree(final)
        durable.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if protocol.is_disk_full(e):
            raise protocol.DiskFull(f"the disk filled up while writing checkpoint {name}: {e}") from e
        raise
    prune(resume_dir, keep)
    return final


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} manifest ({e.__class__.__name__})"
    for fname, digest in manifest.get("files", {}).items():
        f = ckpt / fname
        if not f.is_file():
            return f"{fname} is missing"
        if durable.sha256_file(f) != digest:
            return f"{fname} does not match its sha256"
    return None


def complete_checkpoints(resume_dir: Path) -> list[Path]:
    """Complete-looking checkpoints, newest first (manifest present; contents verified on load)."""
    if not resume_dir.is_dir():
        return []
    found = [p for p in resume_dir.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def prune(resume_dir: Path, keep: int) -> None:
    """Drop temp leftovers and all but the newest `keep` complete checkpoints.

    Runs only after a new checkpoint is complete, so an older complete one survives until then.
    """
    for p in resume_dir.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(PREFIX) and not (p / MANIFEST).exists():
            shutil.rmtree(p, ignore_errors=True)
    for old in complete_checkpoints(resume_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def latest_verified(resume_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that passes verification, reporting any it skips."""
    for ckpt in complete_checkpoints(resume_dir):
        problem = verify(ckpt)
        if problem:
            log(f"skipping checkpoint {ckpt.name}: {problem}")
            continue
        return ckpt
    return None


def examples_fingerprint(examples: list) -> str:
    """sha256 over the token ids of every training example in order (replay included): the plans index them."""
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        ids = np.asarray(ex.input_ids, dtype=np.int64)
        h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return h.hexdigest()


def resumable(resume_dir: Path, fingerprint: str | None, log=print) -> Path | None:
    """latest_verified, when it trained on these very examples; else None, and the job's checkpoints are dropped
    (a later one would outnumber the restarted run's). A checkpoint from before fingerprints is trusted."""
    path = latest_verified(resume_dir, log=log)
    if path is None or fingerprint is None:
        return path
    recorded = json.loads((path / "progress.json").read_text()).get("examples_sha256")
    if recorded in (None, fingerprint):
        return path
    log(f"not resuming from checkpoint {path.name}: it trained on other examples (a replayed file gone or changed "
        "since): starting the job from step 0")
    for old in complete_checkpoints(resume_dir):
        shutil.rmtree(old, ignore_errors=True)
    return None


def load(ckpt: Path, rank: int = 0) -> dict:
    """A checkpoint's contents as `rank` restores them; "rng" is None if no state was saved for that rank
    (the job ran on fewer processes then)."""
    rng = ckpt / rng_file(rank)
    return {
        "weights": load_file(str(ckpt / "adapter.safetensors")),
        "optimizer": torch.load(ckpt / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(ckpt / "scheduler.pt", weights_only=False),
        "rng": torch.load(rng, weights_only=False) if rng.is_file() else None,
        "progress": Progress.from_dict(json.loads((ckpt / "progress.json").read_text())),
        "config": json.loads((ckpt / "config.json").read_text()),
    }


def restore_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint does not match the model: {missing[:3]} ...")
    with torch.no_grad():
        for n, t in weights.items():
            sharding.copy_whole_(params[n], t)
