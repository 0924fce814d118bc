"""What the daemon tells people and machines: status.log, events.jsonl, status.json.

status.log gets one human-readable line per event (made for `tail -f`), also echoed to stdout for
journald; events.jsonl gets the same event as JSON; status.json is an atomic snapshot. What a line shows goes
through daemon.textsafe (a file name's terminal escapes are written as `\\x1b`); the JSON keeps the raw text.

The two logs are kept open and are safe under logrotate: before each write the path is checked against the
open file's inode (a rename or delete means "start a new file"), and reopen() - for SIGHUP - lets go of the
old file at the next write. Logging never raises: a full disk must not take the daemon down with it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from daemon import durable
from daemon.paths import Layout
from daemon.textsafe import for_terminal
from daemon.timefmt import now_iso

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_ALIASES = {"warn": "warning", "critical": "error", "fatal": "error"}
# sd-daemon(3) priority prefixes: journald strips them and files the line at that priority.
_JOURNAL_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}
LEVEL_ENV = "TRAINING_DAEMON_LOG_LEVEL"
_ECHO_JOBS = 64  # jobs whose last echoed progress line is remembered: more than ever run at once


def running_jobs(status: dict) -> list[dict]:
    """The jobs in training, oldest first, as a status.json tells them: its `running` list, or - a status.json
    written by a daemon of the previous version, which ran one job at a time - its `current` alone."""
    running = status.get("running")
    if isinstance(running, list):
        return [job for job in running if isinstance(job, dict)]
    current = status.get("current")
    return [current] if isinstance(current, dict) and current else []


def normalize_level(level: str) -> str:
    name = _ALIASES.get(str(level).lower(), str(level).lower())
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    return name


def one_line(text: str) -> str:
    """A log line stays one line: no newlines, and no carriage returns (progress bars) either."""
    # Split at \n and \r only: splitlines() would also split at \x1c-\x1e, \x85 and \u2028, which a file name may
    # hold and which for_terminal shows escaped instead.
    return " | ".join(part.strip() for part in str(text).replace("\r", "\n").split("\n") if part.strip())


def _stdout_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; compare, as sd_journal_stream_fd says."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stdout.fileno())
        return want == f"{st.st_dev}:{st.st_ino}"
    except (OSError, ValueError, AttributeError):
        return False


class LogFile:
    """An append-only file kept open, that starts over when logrotate has moved it away."""

    def __init__(self, path):
        self.path = path
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    def write(self, line: str) -> None:
        if self.fd is None or self._moved():
            self.close()
            # O_APPEND: every write lands at the end, even after copytruncate or with two writers.
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, durable.FILE_MODE)
            st = os.fstat(self.fd)
            self.ident = (st.st_dev, st.st_ino)
        durable.write_all(self.fd, (line.rstrip("\n") + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = self.ident = None


class StatusWriter:
    """event() for every happening, snapshot() for the current state.

    level: the lowest level written anywhere (default $TRAINING_DAEMON_LOG_LEVEL or "info").
    echo: also print each line to stdout, where systemd's journal collects it; there, progress lines are
    thinned to one per `echo_progress_seconds` per job (status.log and events.jsonl keep every one).
    """

    def __init__(self, layout: Layout, echo: bool = True, level: str | None = None,
                 echo_progress_seconds: float = 30.0):
        self.layout = layout
        self.echo = echo
        self.level = normalize_level(level or os.environ.get(LEVEL_ENV) or "info")
        self.echo_progress_seconds = echo_progress_seconds
        self._log = LogFile(layout.status_log)
        self._events = LogFile(layout.events)
        # Re-entrant: the daemon's signal handlers log from the main thread, possibly mid-event().
        self._lock = threading.RLock()
        self._reopen = False
        self._journal = _stdout_is_journal()
        self._last_progress_echo: dict = {}
        self._reported_errors: set = set()
        self._listeners: list = []
        self._in_listener = threading.local()  # what a listener logs is not handed to listeners again

    def enabled(self, level: str) -> bool:
        try:
            return LEVELS[normalize_level(level)] >= LEVELS[self.level]
        except ValueError:
            return True  # an unknown level is never silently dropped

    def add_listener(self, listener) -> None:
        """listener(kind, record) after each event, whatever the log level (hooks must fire even when
        log_level hides the line); record is what events.jsonl gets. It must return at once."""
        self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def event(self, kind: str, message: str, level: str = "info", **fields) -> None:
        ts = now_iso()
        record = {"ts": ts, "event": kind, "level": level, "message": message, **fields}
        if self.enabled(level):
            self._emit(kind, level, ts, message, record)
        if self._listeners and not getattr(self._in_listener, "active", False):
            self._in_listener.active = True
            try:
                for listener in list(self._listeners):
                    try:
                        listener(kind, record)
                    except Exception as e:  # a listener's bug must never reach the loop that logged the event
                        self.event("listener_error", f"event listener failed on {kind}: {e!r}", level="error",
                                   on=kind)
            finally:
                self._in_listener.active = False

    def _emit(self, kind: str, level: str, ts: str, message: str, record: dict) -> None:
        text = for_terminal(one_line(message))  # user text (file names, errors) never acts on a terminal
        line = f"{ts} {level.upper():5} {text}"
        with self._lock:
            if self._reopen:
                self._reopen = False
                self._log.close()
                self._events.close()
            self._write(self._log, line)
            self._write(self._events, json.dumps(record, default=str, ensure_ascii=False))
        if self.echo and self._echo_now(kind, record):
            out = f"<{_JOURNAL_PRIORITY.get(level, 6)}>{text}" if self._journal else line
            try:
                print(out, file=sys.stdout, flush=True)
            except (OSError, ValueError):
                pass

    def reopen(self) -> None:
        """Let go of the log files at the next write (SIGHUP after logrotate). Only sets a flag:
        safe to call from a signal handler that interrupted a write."""
        self._reopen = True

    def snapshot(self, state: dict) -> bool:
        try:
            with self._lock:  # durable's temp name is per process: one snapshot at a time
                durable.write_json(self.layout.status_json,
                                   {"updated_at": now_iso(), "updated_unix": time.time(), **state})
            self._reported_errors.discard(str(self.layout.status_json))
            return True
        except OSError as e:
            self._report(self.layout.status_json, e)
            return False

    def close(self) -> None:
        with self._lock:
            self._log.close()
            self._events.close()

    def _write(self, log: LogFile, line: str) -> None:
        try:
            log.write(line)
            self._reported_errors.discard(str(log.path))
        except OSError as e:
            self._report(log.path, e)
            log.close()  # and try a fresh open next time: the disk may have room again

    def _report(self, path, error: OSError) -> None:
        if str(path) not in self._reported_errors:  # once per failing spell, not once per event
            self._reported_errors.add(str(path))
            try:
                print(for_terminal(f"training-daemon: cannot write {path}: {error}"), file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    def _echo_now(self, kind: str, fields: dict) -> bool:
        if kind != "progress":
            return True
        step, total = fields.get("step"), fields.get("total_steps")
        now = time.monotonic()
        job = fields.get("job_id")
        last = self._last_progress_echo.get(job)
        if last is None or now - last >= self.echo_progress_seconds or (step is not None and step == total):
            # Per job: with jobs training side by side, one job's line must not reset another's clock.
            self._last_progress_echo.pop(job, None)
            self._last_progress_echo[job] = now
            while len(self._last_progress_echo) > _ECHO_JOBS:  # forget the job echoed longest ago
                del self._last_progress_echo[next(iter(self._last_progress_echo))]
            return True
        return False
