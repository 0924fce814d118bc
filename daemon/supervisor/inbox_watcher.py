"""The inbox watcher: a watchdog observer whose events are hints that make the next inbox scan happen sooner.

It never decides what is in the inbox (daemon/supervisor/intake.py's scans do); it only has to stay alive and
watch the inbox that is there now, which Intake.poll() checks each time (ensure_alive()).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

from daemon import faults

_WAKING_EVENTS = ("created", "closed", "moved")  # "modified" fires per write: the settle timer covers those


class InboxWatcher:
    """A watchdog observer on the inbox (recursive) that turns events into (event_type, path) hints."""

    def __init__(self, inbox: Path, hints: queue.SimpleQueue, polling: bool = False, poll_interval: float = 1.0):
        self.inbox, self.hints, self.polling, self.poll_interval = Path(inbox), hints, polling, poll_interval
        self.observer = None
        self.fallback: str | None = None  # why inotify was not used, if it failed
        # An open descriptor on the watched inbox pins its inode: a deleted and re-created inbox then cannot
        # get the same inode number back (ext4 reuses it at once), so comparing the two tells them apart.
        self._inbox_fd: int | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self.observer is not None:
                return
            fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY)
            try:
                try:
                    observer = self._new_observer(self.polling)
                except OSError as e:  # e.g. the inotify watch limit: polling still works
                    self.fallback = f"inotify unavailable ({e}); polling the inbox instead"
                    observer = self._new_observer(True)
            except BaseException:
                os.close(fd)
                raise
            self.observer, self._inbox_fd = observer, fd

    def _new_observer(self, polling: bool):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserverVFS

        hints, inbox = self.hints, str(self.inbox)
        _quiet_watchdog_shutdown()

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if faults.active("watch_event", kind="drop"):  # what an inotify overflow or NFS does
                    return
                if event.event_type == "moved":
                    hints.put(("moved", Path(os.fsdecode(event.dest_path))))
                elif event.event_type in _WAKING_EVENTS:
                    hints.put((event.event_type, Path(os.fsdecode(event.src_path))))

        # lstat, not stat: the polling snapshot must not walk into a symlinked folder (a link to / ...).
        observer = (PollingObserverVFS(stat=os.lstat, listdir=os.scandir, polling_interval=self.poll_interval)
                    if polling else Observer())
        observer.daemon = True
        try:
            observer.schedule(Handler(), inbox, recursive=True)
            observer.start()
        except BaseException:
            observer.stop()
            raise
        return observer

    def stop(self) -> None:
        with self._lock:
            observer, self.observer = self.observer, None
            fd, self._inbox_fd = self._inbox_fd, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception:
                pass
        if fd is not None:
            os.close(fd)

    def alive(self) -> bool:
        observer, fd = self.observer, self._inbox_fd
        if observer is None or fd is None or not observer.is_alive():
            return False
        if not observer.emitters or not all(e.is_alive() for e in observer.emitters):
            return False  # the inotify emitter stops when the watched folder itself goes away
        try:
            # Deleted and maybe re-created: the emitter may not have seen the deletion yet, so ask the file system.
            return os.path.samestat(os.stat(self.inbox), os.fstat(fd))
        except OSError:
            return False

    def ensure_alive(self) -> bool:
        """Restart a dead observer (or one watching a replaced inbox); True if it had to."""
        if self.alive():
            return False
        self.stop()
        self.start()
        return True


def _quiet_watchdog_shutdown() -> None:
    """watchdog logs an ERROR when its inotify thread is stopped with a read in flight (a harmless race);
    in the daemon's stderr that would read like a real problem at every stop."""
    logger = logging.getLogger("watchdog.observers.inotify")
    if not getattr(logger, "_training_daemon_quiet", False):
        logger.addFilter(lambda record: "called when the thread is inactive" not in record.getMessage())
        logger._training_daemon_quiet = True
