"""The early trainer's GPU gate: a validated job waits here for the daemon's go, loading what it can meanwhile.

Until the go the process has no CUDA context and holds no device lock (docs/architecture.md, "The early
trainer"); the daemon gives the go once the previous trainer has exited and its GPUs were checked.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from daemon.protocol import Event
from daemon.trainer import warm
from daemon.trainer.process import emit, go_is_waiting, rank, wait_for_go

LOCK_WAIT_SECONDS = 60  # the daemon saw them free before the go: only a trainer just exiting may still hold one


def wait(attempt, cfg, base_dir: Path, report, *, stop: threading.Event, locks: list[int]) -> bool:
    """The GPU gate: the job is validated and tokenized; wait for the daemon's go (the previous trainer has
    exited and its GPUs were checked), then take the devices' trainer locks named in the go (bounded), start this
    process's CUDA context in a thread (early_load.EarlyCuda) and go on to load and train. Until the go this
    process has no CUDA context and holds no device lock; meanwhile, in threads, it builds the base model and a
    fresh LoRA in host memory (early_load.Preload; else it reads the weight files into the page cache) and
    validates replay's earlier files ahead (replay.read_ahead). Both are waited for at the go, before anything
    else runs torch (Preload.wait says why). Returns False when `stop` was set while waiting: the attempt ends as
    stopped, with nothing to checkpoint (the next attempt starts from scratch, or from a checkpoint an earlier one
    left). The device locks taken are appended to `locks` (held until the process exits)."""
    from daemon import device_locks
    from daemon.trainer import early_load, replay

    warmer, reader, gone, notes = None, None, threading.Event(), []
    if not go_is_waiting():  # the go is not there yet: another job trains
        emit({"event": Event.PHASE, "phase": "waiting_for_gpu", "cuda_initialized": _cuda_initialized()})
        attempt.preload, why_not = early_load.Preload.start(base_dir, cfg)
        if attempt.preload is None:
            notes.append(f"the base is loaded after the go: {why_not}")
            if rank() == 0:  # one reader is enough: the page cache is the host's
                warmer = warm.Warmer.start(base_dir)
        if report.format != "preference":  # a preference job replays nothing
            reader = threading.Thread(target=replay.read_ahead, daemon=True, name="replay-read-ahead", args=(
                cfg, attempt.layout, attempt.adapter_dir, attempt.tokenizer, base_dir),
                kwargs={"stop": lambda: stop.is_set() or gone.is_set()})
            reader.start()
    go = wait_for_go(stop.is_set)
    gone.set()  # the read-ahead stops after the file it is on; choose() reads the rest itself
    attempt.laps.mark("wait_for_gpu")
    notes.append(warmer.stop() if warmer else None)
    if go is None:  # stopped: the threads die with the process, nothing of theirs is kept
        return False
    if _cuda_initialized():  # a library did it behind our back: say so, the GPU run's check looks for it
        emit({"event": Event.LOG, "level": "warning", "message": "CUDA was initialised before the go"})
    locks.extend(device_locks.acquire_trainer_lock(
        attempt.layout.state, list(go.get("locks") or []), wait=LOCK_WAIT_SECONDS,
        holder="another trainer (the daemon found the lock free when it gave this job the go)"))
    if _cuda_available():  # the devices are ours now: the context is made while the rest goes on
        attempt.early_cuda = early_load.EarlyCuda()
    if attempt.preload is not None:
        attempt.preload.wait()
    if reader is not None:
        reader.join()
    attempt.laps.mark("early_load_rest")
    for note in filter(None, notes):
        emit({"event": Event.LOG, "level": "debug", "message": note})
    return True


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
