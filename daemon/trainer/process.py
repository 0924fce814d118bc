"""The trainer as the daemon's child process: it dies with the daemon, may wait in standby for its job, and
reports on stdout (JSON events, rank 0) and in error.json (daemon/protocol.py says what both may hold)."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from daemon import durable
from daemon import protocol
from daemon.protocol import ErrorKind, Event
from daemon.timefmt import now_iso


def emit(event: dict) -> None:
    """One event line for the daemon: on stdout (its pipe), or appended to $TRAINING_DAEMON_EVENTS_FILE when set
    (a rank under Slurm, daemon/trainer/slurm_rank.py: no pipe outlives a daemon restart)."""
    event.setdefault("ts", time.time())
    line = json.dumps(event, default=str) + "\n"
    path = os.environ.get("TRAINING_DAEMON_EVENTS_FILE")
    if path:
        # Opened and closed per line: one O_APPEND write keeps lines whole, and the close is what makes the line
        # visible to a daemon on another host of a shared (NFS) filesystem.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            durable.write_all(fd, line.encode())
        finally:
            os.close(fd)
        return
    sys.stdout.write(line)
    sys.stdout.flush()


def watch_lifeline(fd: int) -> None:
    """Exit at once when the daemon's end of the pipe closes: no trainer runs unsupervised."""
    def run():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os._exit(protocol.DAEMON_GONE)

    threading.Thread(target=run, daemon=True, name="lifeline").start()


def die_with_parent(parent_pid: int | None) -> None:
    """PR_SET_PDEATHSIG: the kernel kills us when the daemon dies; the pid check closes the race before it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(protocol.DAEMON_GONE)


def rank() -> int:
    """This process's rank among the job's processes (daemon/supervisor/launch.py sets RANK; one process: 0)."""
    return int(os.environ.get("RANK", "0"))


def write_error(job_dir: Path, kind: ErrorKind, message: str) -> None:
    error = {"kind": kind, "message": message, "traceback": traceback.format_exc(), "at": now_iso()}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        durable.write_json(job_dir / "error.json", error)
        return
    # Several ranks: the first to fail tells the cause (the daemon removed the last attempt's file). A peer that
    # fails after it, in a collective with the rank that is gone, only has the consequence to tell.
    tmp = job_dir / f".error.json.rank{rank()}"
    durable.write_json(tmp, error)
    try:
        os.link(tmp, job_dir / "error.json")
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class _Stdin:
    """The daemon's orders on stdin, a line at a time, read from fd 0 itself: a wait for the go must also watch
    the stop flag (select with a timeout), which Python's buffered sys.stdin would hide lines from."""

    def __init__(self):
        self._buf = b""
        self._eof = False

    def line(self, timeout: float | None = None) -> bytes | None:
        """The next line (b"" at EOF), or None when none came within `timeout` seconds (None: wait for it)."""
        while b"\n" not in self._buf and not self._eof:
            ready, _, _ = select.select([0], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(0, 65536)
            self._buf += chunk
            self._eof = not chunk
        line, sep, rest = self._buf.partition(b"\n")
        self._buf = rest
        return line + sep

    def has_line(self) -> bool:
        """A whole line (or EOF) is already waiting: reading it will not block."""
        if b"\n" in self._buf or self._eof:
            return True
        ready, _, _ = select.select([0], [], [], 0)
        return bool(ready)


_STDIN = _Stdin()


def import_training_stack() -> Exception | None:
    """Import what training needs, without touching a GPU; returns the import error, if any. Where bitsandbytes
    is installed, peft and Liger's patches (which import peft, which imports bitsandbytes) wait for the GPU go:
    bitsandbytes asks torch for every visible GPU's capability at import, which makes a CUDA context on each."""
    from daemon.trainer.early_load import bitsandbytes_installed

    try:
        import accelerate  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from daemon.trainer import data, recipe  # noqa: F401

        if not bitsandbytes_installed():
            import peft  # noqa: F401
    except Exception as e:
        return e
    if not bitsandbytes_installed():
        try:  # optional (the training path copes without it); monkey_patch imports every model Liger knows: 0.4 s
            import liger_kernel.transformers  # noqa: F401
            import liger_kernel.transformers.monkey_patch  # noqa: F401
        except Exception:
            pass
    try:  # the loss plot's (publish_step): 0.27 s of import that would otherwise come after the last step,
        # while the trainer still holds the GPU
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # publishing says what is wrong with it, where it is needed
        pass
    return None


def wait_for_job() -> tuple[dict | None, Exception | None]:
    """Standby: pay for the imports (10-20 s on a GPU host) while the daemon waits for a file, then take the job
    the daemon writes on stdin as one JSON line. No CUDA here: the GPU stays untouched until the go (wait_for_go).
    An import that fails is kept and returned with the job, so that the job's error.json tells it."""
    import_error = import_training_stack()
    emit({"event": Event.STANDBY, "pid": os.getpid()})
    line = _STDIN.line()
    if not line or not line.strip():
        return None, None
    order = json.loads(line)
    # From here on this is an ordinary trainer for that job: its stderr goes to the job's trainer.log (a rank
    # other than 0: trainer-rank<N>.log, as protocol.log_name names it).
    name = "trainer.log" if rank() == 0 else f"trainer-rank{rank()}.log"
    log = os.open(Path(order["job_dir"]) / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(log, 2)
    os.close(log)
    return order, import_error


def go_is_waiting() -> bool:
    """The daemon's go (or its EOF) is already on stdin: waiting for it will not block."""
    return _STDIN.has_line()


def wait_for_go(stopped) -> dict | None:
    """The GPU gate of an early trainer (daemon/supervisor/standby.py): wait for the daemon's go line on stdin,
    {"go": true, "locks": [...]}, which it writes once no other trainer is past its gate and the previous job's
    GPU check is done. None when the wait ends without one: `stopped()` turned true (a warm stop, a pause) or
    the daemon closed stdin. A go already written wins over a stop that came after it: the daemon writes it to
    every rank at once, so all ranks go on (and agree on the stop in the recipe) or none does."""
    while True:
        stop = stopped()
        line = _STDIN.line(timeout=0 if stop else 0.2)
        if line is None:
            if stop:
                return None
            continue
        if not line.strip():
            return None  # EOF: the daemon let us go without a job to train
        order = json.loads(line)
        if order.get("go"):
            return order
