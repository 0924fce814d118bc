"""The trainer child: `python -m daemon.trainer.main JOB_DIR --root ROOT`.

It validates the job's file, trains, and publishes a version; its exit status (daemon/protocol.py) says how
that ended. How it lives beside the daemon (lifeline, standby, events on stdout) is daemon/trainer/process.py.
`run()` is one attempt at a job, as its steps: recover, load the config, validate, train, build the metadata,
publish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from daemon import durable, faults
from daemon import protocol
from daemon import versions
from daemon.base_model import resolve_base_model
from daemon.config import from_dict
from daemon.config_errors import ConfigError
from daemon.paths import Layout
from daemon.protocol import ErrorKind, Event
from daemon.timefmt import now_iso
from daemon.trainer import gpu_gate, publish_step
from daemon.trainer.parent import choose_parent
from daemon.trainer.eval_pool import EvalFileError, StandingSet, load_standing_set
from daemon.trainer.fingerprint import base_fingerprint
from daemon.trainer.timings import Laps
from daemon.trainer.process import (die_with_parent, emit, rank, wait_for_job,
                                    watch_lifeline, write_error)

# torch and the training modules are imported inside the steps that use them: a trainer whose stack cannot
# load must still get as far as writing the job's error.json (main).

_stop = threading.Event()
_device_locks: list[int] = []  # the trainer locks an early trainer took after its go: held until it exits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.trainer.main")
    ap.add_argument("job_dir", type=Path, nargs="?")
    ap.add_argument("--standby", action="store_true",
                    help="import the training stack, then wait for a job on stdin (daemon/supervisor/standby.py)")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--lifeline-fd", type=int)
    ap.add_argument("--parent-pid", type=int, help="the daemon's pid: exit if it is already gone")
    ap.add_argument("--micro-batch", type=int, help="override after an out-of-memory retry")
    args = ap.parse_args(argv)
    die_with_parent(args.parent_pid)
    if args.lifeline_fd is not None:
        watch_lifeline(args.lifeline_fd)
    faults.check("trainer_start")
    # Before any event: the daemon holds a warm stop back until our first event (trainer_process.py), so a
    # SIGUSR1 never meets its default action (death) before this handler is set.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: _stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides what a Ctrl-C means
    import_error = None
    gated = False
    if args.standby:
        order, import_error = wait_for_job()
        if order is None:
            return protocol.DONE  # the daemon closed our stdin: no job for us
        args.job_dir, args.micro_batch = Path(order["job_dir"]), order.get("micro_batch")
        gated = bool(order.get("gated"))
    elif args.job_dir is None:
        ap.error("JOB_DIR is required without --standby")
    job_dir, layout = args.job_dir.resolve(), Layout.at(args.root)
    try:
        if import_error is not None:
            raise import_error  # the job learns why its trainer cannot train, in its own error.json
        return run(job_dir, layout, args.micro_batch, gated=gated)
    except Exception as e:  # the last line of defence: the daemon gets the full traceback, never a truncated one
        # ENOSPC can come from anywhere (a library's save, report.json, the warm stop's checkpoint): it is a
        # full disk, not a bug.
        full = protocol.is_disk_full(e)
        # Not about the job (the base model gone, a read-only disk): the daemon blocks the queue, counts nothing.
        unavailable = protocol.unavailable_reason(e)
        kind, code = ((ErrorKind.DISK_FULL, protocol.DISK_FULL) if full else
                      (ErrorKind.UNAVAILABLE, protocol.UNAVAILABLE) if unavailable else
                      (ErrorKind.ERROR, protocol.FAILED))
        try:
            write_error(job_dir, kind, unavailable or f"{type(e).__name__}: {e}")
        except OSError:
            pass  # the disk itself may be the problem: the exit status still tells the daemon
        traceback.print_exc()
        return code


# ---------------------------------------------------------------- one attempt at a job, step by step

class AttemptEnds(Exception):
    """A step ended the attempt before it published: `code` is the exit status that says why."""

    def __init__(self, code: int):
        super().__init__(protocol.NAMES.get(code, str(code)))
        self.code = code


@dataclass
class Attempt:
    """The job this trainer works on, and where its versions go."""

    job_dir: Path
    job: dict  # job.json
    adapter_dir: Path
    started_at: str = field(default_factory=now_iso)
    micro_batch: int | None = None  # at most this many examples per micro-batch (load_config sets it)
    base_fingerprint: str | None = None  # the base model's identity by content (train sets it, before loading)
    parent_notes: list[str] = field(default_factory=list)  # why a version was not trained on (choose_parent)
    layout: Layout | None = None
    tokenizer: object = None  # the base model's (validate loads it)
    standing: StandingSet = field(default_factory=lambda: StandingSet("none"))  # what versions are judged on
    replay: object = None  # replay.Replay: the earlier files' examples trained along (train)
    laps: Laps = field(default_factory=Laps)  # where the attempt's seconds went (metadata "seconds")
    preload: object = None  # early_load.Preload: the base built on the CPU while waiting for the GPU
    early_cuda: object = None  # early_load.EarlyCuda: the CUDA context made at the go, in a thread


def run(job_dir: Path, layout: Layout, micro_batch: int | None, gated: bool = False) -> int:
    """One attempt at the job, step by step; a step that ends it early raises AttemptEnds with the exit status.

    `gated`: an early trainer, handed its job while another trains (daemon/supervisor/standby.py). It prepares
    what needs only the CPU and the job itself (config, validation, tokenization, report.json), then waits at
    the GPU gate (gpu_gate.wait) and only then does what depends on the GPU or on the adapter's previous job:
    an earlier attempt's published version (recover), the standing eval set (the eval pool the previous job may
    grow), the parent version and replay (train)."""
    job = json.loads((job_dir / "job.json").read_text())
    attempt = Attempt(job_dir, job, layout.adapter_dir(job["adapter"]), layout=layout)
    try:
        if not gated:
            recover(attempt)
        cfg, snapshot = load_config(attempt, micro_batch)
        try:
            base_dir = resolve_base_model(cfg.base_model)
        except ConfigError as e:  # it resolved when the daemon read the config: it has gone since
            raise protocol.Unavailable("base model unavailable: " + "; ".join(i["message"] for i in e.errors)) from e
        report = validate(attempt, cfg, base_dir)
        attempt.laps.mark("validate")
        if gated:
            if not gpu_gate.wait(attempt, cfg, base_dir, report, stop=_stop, locks=_device_locks):
                raise AttemptEnds(protocol.STOPPED)  # stopped while waiting: nothing of the threads' is kept
            recover(attempt)
        load_standing(attempt, cfg, base_dir)
        attempt.laps.mark("standing_set")
        recipe = train(attempt, cfg, snapshot, base_dir, report)
        verdict = judge(attempt, recipe, cfg)  # every rank: evaluation is a collective
        attempt.laps.mark("judge")
        if recipe.world.is_main:
            metadata = publish_step.build_metadata(attempt, recipe, cfg, base_dir, report, verdict)
            try:
                publish_step.publish(attempt, recipe, metadata)
            except protocol.DiskFull as e:
                raise failed(attempt.job_dir, ErrorKind.DISK_FULL, str(e), protocol.DISK_FULL) from e
            attempt.laps.mark("publish")
            emit({"event": Event.LOG, "level": "debug", "message": "seconds: " + ", ".join(
                f"{name} {took:.2f}" for name, took in attempt.laps.as_dict().items())})
        else:  # rank 0 publishes; a sharded adapter needs every rank to gather it
            recipe.save_adapter(None)
    except AttemptEnds as end:
        return end.code
    from daemon.trainer import distributed

    recipe.cleanup()
    distributed.shutdown()
    return protocol.DONE


def failed(job_dir: Path, kind: ErrorKind, message: str, code: int) -> AttemptEnds:
    """error.json for a failure the trainer recognises, and the end of the attempt that goes with it."""
    write_error(job_dir, kind, message)
    return AttemptEnds(code)


def recover(attempt: Attempt) -> None:
    """What an earlier attempt left: a version it published before dying finishes the job (result.json, `latest`
    repaired) instead of training it twice. Its checkpoints are for the recipe (recipe.py) to resume from."""
    done = versions.find_version_of_job(attempt.adapter_dir, attempt.job["id"])
    if done is None:
        return
    if rank() == 0:
        path = attempt.adapter_dir / f"v{done}"
        meta = versions.read_metadata(attempt.adapter_dir, done)
        outcome = publish_step.published_fields(done, meta)
        if outcome["decision"] != "held":  # the gate's verdict stands: a held version never becomes `latest` here
            versions.repair_latest(attempt.adapter_dir)
        outcome["latest"] = versions.promoted_version(attempt.adapter_dir)
        durable.write_json(attempt.job_dir / "result.json", {"version": done, "path": str(path), "recovered": True,
                                                             **outcome})
        emit({"event": Event.PUBLISHED, "version": done, "path": str(path), **outcome})
    raise AttemptEnds(protocol.DONE)


def load_config(attempt: Attempt, micro_batch: int | None):
    """The config the daemon snapshotted into config.json when it took the job, and that snapshot."""
    snapshot = json.loads((attempt.job_dir / "config.json").read_text())
    cfg = from_dict(snapshot)
    # After an out-of-memory retry the daemon asks for a smaller micro-batch; the recipe keeps the effective
    # batch by accumulating more.
    attempt.micro_batch = min(micro_batch or cfg.training.micro_batch_size, cfg.training.micro_batch_size)
    faults.set_context(micro_batch=attempt.micro_batch, job_id=attempt.job["id"])
    return cfg, snapshot


def validate(attempt: Attempt, cfg, base_dir: Path):
    """Check and tokenize the job's file, writing report.json: bad input ends the attempt (retrying cannot help)."""
    emit({"event": Event.PHASE, "phase": "validating"})
    faults.check("validate")
    from transformers import AutoTokenizer

    from daemon.trainer.data import validate_for_config

    tokenizer = attempt.tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=cfg.trust_remote_code)
    report = validate_for_config(attempt.job_dir / "input.jsonl", tokenizer, cfg, base_dir=base_dir,
                                 keep_examples=True)
    report.file = attempt.job["original_name"]  # the user's name for it, not the job folder's copy
    # Checked after the read that training uses: what trains is exactly what job.json's sha256 names.
    if changed := input_changed(attempt.job_dir / "input.jsonl", attempt.job):
        durable.write_json(attempt.job_dir / "error.json", {"kind": ErrorKind.BAD_INPUT, "message": changed,
                                                            "at": now_iso()})
        emit({"event": Event.INVALID, "message": changed})
        raise AttemptEnds(protocol.BAD_INPUT)
    if rank() == 0:  # every rank validates the same file alike
        durable.write_json(attempt.job_dir / "report.json", report.to_dict())
    if not report.ok:
        durable.write_json(attempt.job_dir / "error.json",
                           {"kind": ErrorKind.BAD_INPUT, "message": report.render(), "at": now_iso()})
        emit({"event": Event.INVALID, "message": report.render()})
        raise AttemptEnds(protocol.BAD_INPUT)
    emit({"event": Event.VALIDATED, "examples": report.examples, "tokens": report.tokens, "skipped": report.skipped})
    if _stop.is_set() and "WORLD_SIZE" not in os.environ:  # ranks agree on a stop only once they can talk (recipe)
        raise AttemptEnds(protocol.STOPPED) from None
    return report


def load_standing(attempt: Attempt, cfg, base_dir: Path) -> None:
    """The standing eval set (versions.eval_file, else the adapter's eval pool as it is before this job), checked
    and tokenized before training: a broken eval file fails the job at once, as a config error naming the file and
    the line (retrying cannot help)."""
    try:
        attempt.standing = load_standing_set(cfg, attempt.adapter_dir, attempt.tokenizer, base_dir)
    except EvalFileError as e:
        emit({"event": Event.LOG, "level": "error", "message": str(e)})  # the job's own file is fine: not INVALID
        raise failed(attempt.job_dir, ErrorKind.BAD_CONFIG, str(e), protocol.BAD_INPUT) from None
    for message in attempt.standing.notes:
        emit({"event": Event.LOG, "message": message})


def input_changed(path: Path, job: dict) -> str | None:
    """Why input.jsonl is not the file the daemon claimed (a writer that kept it open appended to it), or None."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
    if digest == job.get("sha256"):
        return None
    claimed = str(job.get("sha256"))[:12]
    return (f"input.jsonl changed after it was claimed: it was {job.get('size')} B (sha256 {claimed}), it is now "
            f"{size} B (sha256 {digest[:12]}); something kept writing to it after it settled. Drop the complete "
            "file again")


def train(attempt: Attempt, cfg, snapshot: dict, base_dir: Path, report):
    """Load the model with its LoRA (on the parent version's, if any), resume from the newest checkpoint and
    train; returns the trained recipe. A warm stop checkpoints; a known failure writes error.json."""
    import torch

    from daemon.trainer import checkpoint
    from daemon.trainer import distributed
    from daemon.trainer import replay
    from daemon.trainer.dpo_recipe import recipe_for
    from daemon.trainer.recipe import Diverged, NoSteps, StopRequested

    t = cfg.training
    train_ex, eval_ex = split_eval(report.examples_list, t, t.seed)
    attempt.base_fingerprint = base_fingerprint(base_dir)
    parent = choose_parent(attempt, cfg, base_dir)
    # Chosen from the parent's lineage and the seed alone, and appended before the batches are planned: a
    # resumed attempt trains exactly the same examples in the same order.
    attempt.replay = replay.choose(cfg, attempt.layout, attempt.adapter_dir, parent, len(train_ex),
                                   attempt.tokenizer, base_dir, preference=report.format == "preference")
    replay.forget()  # the files read (ahead) for it: what was chosen is in attempt.replay
    for message in attempt.replay.notes:
        emit({"event": Event.LOG, "message": f"replay: {message}"})
    train_ex = train_ex + attempt.replay.examples
    emit({"event": Event.PHASE, "phase": "loading"})
    faults.check("load")
    checkpoint.check_free_space(attempt.job_dir, cfg.limits.min_free_disk_mb)
    tensorboard = attempt.adapter_dir / "tensorboard" if cfg.status.tensorboard else None
    recipe = recipe_for(report.format)(cfg, emit=emit, job_dir=attempt.job_dir, stop_flag=_stop.is_set,
                        tensorboard=(tensorboard, f"job-{attempt.job['id']}") if tensorboard else None,
                        laps=attempt.laps)
    attempt.laps.mark("parent_replay")
    try:
        recipe.setup(train_ex, eval_ex, base_dir=base_dir,
                     adapter_dir=attempt.adapter_dir / f"v{parent}" if parent else None, config_snapshot=snapshot,
                     max_micro_batch=attempt.micro_batch, tokenizer=attempt.tokenizer, preload=attempt.preload)
        for early in (attempt.preload, attempt.early_cuda):
            if early is not None:
                emit({"event": Event.LOG, "level": "debug", "message": early.note()})
        attempt.preload = attempt.early_cuda = None
        recipe.progress.parent_version = parent
        emit({"event": Event.PHASE, "phase": "training", "total_steps": recipe.progress.total_steps,
              "examples": len(train_ex), "eval_examples": len(eval_ex), "replayed": len(attempt.replay.examples),
              "plan": recipe.plan})
        recipe.train()
    except StopRequested:
        emit({"event": Event.PHASE, "phase": "saving"})
        recipe.save_checkpoint()
        distributed.shutdown()
        raise AttemptEnds(protocol.STOPPED) from None
    except Diverged as e:
        raise failed(attempt.job_dir, ErrorKind.DIVERGED, str(e), protocol.BAD_INPUT) from e
    except NoSteps as e:
        raise failed(attempt.job_dir, ErrorKind.NO_STEPS, str(e), protocol.BAD_INPUT) from e
    except torch.OutOfMemoryError as e:
        raise failed(attempt.job_dir, ErrorKind.OUT_OF_MEMORY,
                     f"out of memory at micro-batch {attempt.micro_batch}: {e}", protocol.OUT_OF_MEMORY) from e
    except protocol.DiskFull as e:
        raise failed(attempt.job_dir, ErrorKind.DISK_FULL, str(e), protocol.DISK_FULL) from e
    return recipe


def judge(attempt: Attempt, recipe, cfg) -> dict:
    """The verdict on the trained adapter (publish_step.judge_version). Out of memory while measuring the new
    version ends the attempt as out_of_memory (the daemon retries with a smaller micro-batch) after a checkpoint of
    the trained state, so the retry judges without training again. (The incumbent's failures are notes: judge.py.)"""
    import torch

    try:
        return publish_step.judge_version(attempt, recipe, cfg)
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if recipe.world.size == 1:  # several ranks: the others may wait in a collective; the daemon stops them
            recipe.save_checkpoint()
        raise failed(attempt.job_dir, ErrorKind.OUT_OF_MEMORY, f"out of memory while judging the new version at "
                     f"micro-batch {attempt.micro_batch}: {e}", protocol.OUT_OF_MEMORY) from e


def split_eval(examples: list, training, seed: int) -> tuple[list, list]:
    """A held-out split: min(eval_max_examples, eval_fraction * n), chosen by seed, never the whole set."""
    import random

    n_eval = min(training.eval_max_examples, int(training.eval_fraction * len(examples)))
    if n_eval <= 0 or len(examples) - n_eval < 1:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


if __name__ == "__main__":
    code = main()
    # Python's own teardown (module finalisers, torch's atexit work) takes ~0.7 s and frees nothing that the
    # process exit does not: every file that matters was fsynced, the process group was left. Flush and go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
