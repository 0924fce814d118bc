"""Whether the next job may start, and if not, what the daemon waits for.

Above all: when something every job needs is missing - the base model, the GPUs the config asks for, a
writable disk - the queue is blocked instead of failing job after job. problem() says what is missing; it is
asked before each job starts, after a job failed (was it the machine, not the job?) and, while blocked, every
RECHECK_SECONDS; the block ends when it answers None. Then the two plain waits: free disk space below the
floor, and a device's trainer lock still held by an earlier daemon's trainer. No torch here: the daemon imports it.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import time

from daemon.base_model import resolve_base_model
from daemon.config_errors import ConfigError
from daemon.paths import Layout, UserError
from daemon.supervisor import gpu, launch
from daemon.timefmt import now_iso

RECHECK_SECONDS = 10.0

# What from_pretrained reads from a base folder: the config, the weights, the tokenizer.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
               "*.bin.index.json", "*.gguf", "tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "chat_template.*", "*.tiktoken", "spiece.model")


def problem(cfg, layout: Layout) -> str | None:
    """What would make any job fail now, in words (the first found), or None."""
    return (base_model_problem(cfg.base_model) or gpu_problem(cfg) or slurm_problem(cfg)
            or read_only_problem(layout))


def slurm_problem(cfg) -> str | None:
    """With executor: slurm, Slurm's commands missing, its controller not answering or the partition unknown
    (one `sinfo`): every submission would fail, so the queue waits instead."""
    if getattr(cfg, "executor", "local") != "slurm":
        return None
    from daemon.supervisor import slurm_commands  # only with executor: slurm

    return slurm_commands.problem(cfg)


def base_model_problem(value: str) -> str | None:
    """The base model's folder is gone, or a file in it cannot be read (its first byte: the weights are not read)."""
    try:
        folder = resolve_base_model(value)
    except ConfigError as e:
        return "base model unavailable: " + "; ".join(i["message"] for i in e.errors)
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        return f"base model unreadable: {folder}: {e.strerror}"
    for name in names:
        if not any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES):
            continue  # a README or LICENSE the loader never reads must not stop the queue
        path = folder / name
        if path.is_symlink() and not path.exists():  # a Hugging Face cache snapshot links to its blobs
            return f"base model incomplete: {path} links to a file that is gone"
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as e:
                return f"base model unreadable: {path}: {e.strerror}"
    return None


def gpu_problem(cfg) -> str | None:
    """The GPUs the config asks for are not all visible (a driver reset, a card taken away, MIG changed).
    With executor: slurm they are the nodes' GPUs, which Slurm allocates: not this host's to check."""
    if getattr(cfg, "executor", "local") == "slurm":
        return None
    try:
        launch.grant(cfg.gpus, cfg.cpu_processes, gpu.visible_devices())
    except UserError as e:
        return str(e)
    if gone := gpu.gone_devices():  # `gpus: all` shrinks with the GPUs it sees: what it saw before is the measure
        return (f"GPU {', '.join(gone)} {'was' if len(gone) == 1 else 'were'} visible to the daemon and "
                f"{'is' if len(gone) == 1 else 'are'} not now (NVML "
                + ("does not answer" if gpu.visible_devices() is None else "lists " +
                   (", ".join(gpu.visible_devices()) or "none")) + "); jobs wait until it is back or the daemon "
                "is restarted without it")
    return None


def read_only_problem(layout: Layout) -> str | None:
    """The root's filesystem takes no writes (remounted read-only after an I/O error, say)."""
    probe = layout.state / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"the disk is read-only: cannot write in {layout.state}: {e.strerror}"
    return None


class Gate:
    """Whether jobs may start. Blocked while something every job needs is missing, with the reason, said once in
    status.log and shown in status.json (`daemon.blocked`) and STATUS= for as long as it lasts."""

    def __init__(self, layout: Layout, status):
        self.layout, self.status = layout, status
        self.reason: str | None = None  # None: open
        self.since: str | None = None
        self.confirmed = True  # whether problem() itself sees the cause the queue is blocked for
        self._next_check = 0.0
        self.disk_note: str | None = None  # how much space is left, while below the floor
        self._lock_wait_said = False

    def wait_state(self, cfg, min_free_mb: int, *, locks: list[str] | None) -> str | None:
        """None when the next job (with this config) may start; else the daemon's state while it waits:
        "blocked", "waiting_for_disk" or "waiting_for_trainer". `locks`: the trainer locks its grant takes
        (launch.lock_names), None when none need checking (the early trainer holds them, or Slurm runs it)."""
        if self.check(cfg):
            return "blocked"
        if self.disk_low(min_free_mb):
            return "waiting_for_disk"
        if locks and self.trainer_lock_held(locks):
            return "waiting_for_trainer"
        return None

    @property
    def shut(self) -> bool:
        return self.reason is not None

    def still_blocked(self, cfg) -> bool:
        """With no job pending: the block is still shown, and re-checked, since the next file would meet it."""
        return self.shut and self.check(cfg)

    def check(self, cfg) -> bool:
        """True while jobs may not start. Asks problem() before each job starts and, once shut, every
        RECHECK_SECONDS (or at once after check_now()); opens again when the cause is gone."""
        if self.shut and time.monotonic() < self._next_check:
            return True
        cause = problem(cfg, self.layout)
        if cause is None:
            if self.shut:
                how = ("fixed; jobs start again" if self.confirmed else
                       "the daemon's own checks see no problem; trying again")
                self.status.event("unblocked", f"unblocked: {self.reason} - {how}", reason=self.reason)
                self.reason = self.since = None
            return False
        self.shut_for(cause)
        return True

    def shut_for(self, cause: str, confirmed: bool = True) -> None:
        """No job starts until `cause` is gone (a job's trainer found it, or problem() did). `confirmed`: the
        daemon's own checks see it too (else they cannot tell when it is gone: the next re-check tries again)."""
        self.confirmed = confirmed
        if cause != self.reason:
            self.status.event("blocked", f"blocked, no job starts: {cause}; re-checked every {RECHECK_SECONDS:.0f}s "
                              "(`training-daemon resume` re-checks at once); no job fails meanwhile",
                              level="error", reason=cause)
        self.since = self.since or now_iso()
        self.reason = cause
        self._next_check = time.monotonic() + RECHECK_SECONDS

    def disk_low(self, min_free_mb: int) -> bool:
        """True while the root's free space is below the floor (said once per spell; waits a second)."""
        free_mb = shutil.disk_usage(self.layout.root).free / 2**20
        if free_mb >= min_free_mb:
            self.disk_note = None
            return False
        if self.disk_note is None:
            self.status.event("disk_low", f"only {free_mb:.0f} MiB free (floor {min_free_mb} MiB): "
                              "waiting before the next job", level="error")
        self.disk_note = f"only {free_mb:.0f} MiB free (floor {min_free_mb} MiB)"
        time.sleep(1)
        return True

    def trainer_lock_held(self, locks: list[str]) -> bool:
        """Never two trainers on one device: a trainer left by a dead daemon holds its devices' locks
        (state/trainer-gpu0.lock, state/trainer-cpu0.lock, ...) until its lifeline makes it exit. Until then
        the job that needs them waits, and the daemon goes on watching the inbox, the signals, other jobs."""
        held = launch.held_trainer_lock(self.layout.state, locks)
        if held is None:
            self._lock_wait_said = False
            return False
        if not self._lock_wait_said:
            self.status.event("waiting_for_trainer", f"a trainer from an earlier daemon still holds "
                              f"{held}; waiting for it to exit", level="warning")
            self._lock_wait_said = True
        return True

    def check_now(self) -> None:
        self._next_check = 0.0

    def as_status(self) -> dict | None:
        """status.json's `daemon.blocked`, which `status` and the page show."""
        if not self.shut:
            return None
        return {"reason": self.reason, "since": self.since, "recheck_seconds": RECHECK_SECONDS}
