"""The inbox: find complete files, claim them into the queue, and treat a hostile inbox calmly.

Files directly in inbox/ train adapter "default", files in inbox/<adapter>/ train <adapter>; deeper folders
are not followed. Nothing in the inbox is ever opened: symlinks are moved (unread) into a failed job,
FIFOs, devices and sockets are only lstat()ed and skipped. A file is complete once its (size, mtime, inode)
stayed the same for settle_seconds, or ~0.2 s after a watchdog event said the writer closed it or moved it
in. Watchdog events are hints that make a scan happen sooner; the periodic rescan is the truth.
"""

from __future__ import annotations

import os
import queue
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from daemon.supervisor.claimed_input import StillChanging
from daemon.supervisor.inbox_watcher import InboxWatcher
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import DUPLICATE_NOTE
from daemon.paths import DEFAULT_ADAPTER, Layout, UserError, check_adapter_name
from daemon.textsafe import for_terminal
from daemon.timefmt import now_iso

HINT_QUIET_SECONDS = 0.2  # after a "closed"/"moved in" event: no change for this long, then take the file
CLAIM_BUDGET_SECONDS = 1.0  # claim (hash) for at most this long per poll; the rest waits for the next one
RETRY_BROKEN_SECONDS = 60.0  # a file whose claim failed is tried again after this, or when it changes
_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket"}


@dataclass(frozen=True)
class Candidate:
    path: Path
    adapter: str
    original_name: str
    first_seen: float = 0.0  # wall-clock time the scan first saw it (arrival order)
    settled: tuple[int, int] | None = None  # (size, mtime_ns) it kept for settle_seconds: the claim checks it


@dataclass
class _Seen:
    ident: tuple[int, int, int]  # (size, mtime_ns, inode)
    changed_at: float  # monotonic time the ident last changed
    first_seen: float  # wall-clock time of the first sighting
    hinted: bool = False


@dataclass
class ScanState:
    """What scans remember: when each file was first seen and last changed, which problems were reported,
    and the hints waiting to be applied. `notices` collects (kind, message, fields) for the caller to log."""

    seen: dict[Path, _Seen] = field(default_factory=dict)
    reported: set[tuple[str, Path]] = field(default_factory=set)
    hints: set[Path] = field(default_factory=set)
    notices: list[tuple[str, str, dict]] = field(default_factory=list)
    next_due: float = float("inf")  # monotonic time at which a tracked file would have settled

    def report_once(self, kind: str, path: Path, message: str, **fields) -> None:
        if (kind, path) not in self.reported:
            self.reported.add((kind, path))
            self.notices.append((kind, message, {"path": str(path), **fields}))


def show(name: str | os.PathLike) -> str:
    """A file name fit for a one-line log: control characters (newlines!) and undecodable bytes escaped."""
    return for_terminal(os.fspath(name))


def scan_inbox(layout: Layout, settle_seconds: float, ignore_suffixes, state: ScanState | None = None,
               ) -> list[Candidate]:
    """The complete files in the inbox, in arrival order (first seen, then mtime, then name).

    Without `state` every call is a first look, so only settle_seconds <= 0 returns anything.
    """
    state = state if state is not None else ScanState()
    now, wall = time.monotonic(), time.time()
    suffixes = tuple(ignore_suffixes or ())
    present: dict[Path, tuple[str, str, os.stat_result]] = {}
    for path, adapter, st in _walk(layout.inbox, suffixes, state):
        present[path] = (adapter, path.name, st)

    for gone in set(state.seen) - set(present):
        del state.seen[gone]
    state.reported = {(k, p) for k, p in state.reported if p in present or os.path.lexists(p)}

    ready, state.next_due = [], float("inf")
    for path, (adapter, name, st) in present.items():
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        seen = state.seen.get(path)
        if seen is None:
            seen = state.seen[path] = _Seen(ident, now, wall)
            state.notices.append(("file_seen", f"inbox: {show(_rel(layout, path))} ({_size(st.st_size)}) "
                                  f"seen for adapter {adapter}", {"path": str(path), "adapter": adapter,
                                                                  "size": st.st_size}))
        elif seen.ident != ident:
            seen.ident, seen.changed_at = ident, now
        if path in state.hints:
            seen.hinted = True
        need = min(settle_seconds, HINT_QUIET_SECONDS) if seen.hinted else settle_seconds
        if now - seen.changed_at >= need:
            ready.append((seen.first_seen, st.st_mtime_ns, name,
                          Candidate(path, adapter, name, seen.first_seen, ident[:2])))
        else:
            state.next_due = min(state.next_due, seen.changed_at + need)
    state.hints.clear()
    ready.sort(key=lambda r: r[:3])
    return [r[3] for r in ready]


def _walk(inbox: Path, suffixes: tuple[str, ...], state: ScanState):
    """(path, adapter, lstat) of every file or symlink that may become a job; reports the rest once."""
    for entry, st in _entries(inbox):
        if stat.S_ISDIR(st.st_mode):
            try:
                adapter = check_adapter_name(entry.name)
            except UserError as e:
                state.report_once("file_rejected", Path(entry.path), f"inbox: folder {show(entry.name)!s}/ is not "
                                  f"followed: {e}", reason="bad_adapter_folder")
                continue
            for sub, sub_st in _entries(Path(entry.path)):
                yield from _one(Path(sub.path), adapter, sub_st, suffixes, state, f"{adapter}/")
        else:
            yield from _one(Path(entry.path), DEFAULT_ADAPTER, st, suffixes, state, "")


def _one(path: Path, adapter: str, st: os.stat_result, suffixes, state: ScanState, prefix: str):
    name = path.name
    if name.startswith(".") or name.endswith(suffixes):
        return  # partial uploads and hidden files: taken after the rename to their final name
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        yield path, adapter, st
    elif stat.S_ISDIR(st.st_mode):
        state.report_once("file_rejected", path, f"inbox: folder {show(prefix + name)}/ is not followed: "
                          "only inbox/<file> and inbox/<adapter>/<file> are taken", reason="nested_folder")
    else:
        what = _SPECIAL.get(stat.S_IFMT(st.st_mode), "not a regular file")
        state.report_once("file_rejected", path, f"inbox: {show(prefix + name)} skipped: it is {what}, not a "
                          "regular file (it was not opened)", reason="special_file")


def _entries(folder: Path):
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        try:
            yield entry, entry.stat(follow_symlinks=False)
        except OSError:
            continue  # vanished between listing and lstat


def _rel(layout: Layout, path: Path) -> str:
    try:
        return str(path.relative_to(layout.inbox))
    except ValueError:
        return str(path)


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds")


class Intake:
    """Turns files in the inbox into queued jobs: poll() is called from the daemon loop and never raises."""

    def __init__(self, layout: Layout, intake_cfg, spool, status):
        self.layout, self.cfg, self.spool, self.status = layout, intake_cfg, spool, status
        self.hints: queue.SimpleQueue = queue.SimpleQueue()
        self.watcher = InboxWatcher(layout.inbox, self.hints, polling=bool(intake_cfg.polling),
                                    poll_interval=min(1.0, float(intake_cfg.rescan_seconds)))
        self.state = ScanState()
        self._watching = False
        self._next_rescan = 0.0  # the first poll scans at once
        self._broken: dict[Path, tuple[tuple, float]] = {}
        self.claim_failures: set[Path] = set()  # files left in the inbox because taking them failed
        self._waiting_duplicates: set[int] | None = None  # pending jobs whose original has not ended yet

    def start(self) -> None:
        self._watching = True
        try:
            self.layout.inbox.mkdir(parents=True, exist_ok=True)
            self.watcher.start()
            if self.watcher.fallback:
                self._event("watcher_restarted", self.watcher.fallback, level="warning")
        except Exception as e:
            self._event("watcher_restarted", f"inbox watcher not started ({e}); relying on rescans every "
                        f"{self.cfg.rescan_seconds}s", level="warning")

    def stop(self) -> None:
        self._watching = False
        self.watcher.stop()

    def poll(self, timeout: float) -> list:
        """Wait up to `timeout` for a hint or a due scan; then scan and claim. Returns the new jobs
        (queued ones, and also duplicates finished into done/ and symlinks failed at once)."""
        try:
            settled = self._settle_duplicates()
            if settled:
                return settled  # the loop learns of them before it picks the next pending job
            self._check_watcher()
            deadline = time.monotonic() + max(0.0, timeout)
            woken = self._take_hints()
            due = min(self._next_rescan, self.state.next_due)
            if not woken and time.monotonic() < due:
                wait = min(deadline, due) - time.monotonic()
                if wait > 0:
                    try:
                        self._hint(self.hints.get(timeout=wait))
                        woken = True
                        self._take_hints()
                    except queue.Empty:
                        pass
                if not woken and time.monotonic() < due:
                    return []
            return self._scan_and_claim()
        except Exception as e:  # the daemon loop must go on whatever the inbox holds
            self._event("file_rejected", f"inbox: scan failed: {type(e).__name__}: {e}", level="error")
            self._next_rescan = time.monotonic() + float(self.cfg.rescan_seconds)
            return []

    # ----------------------------------------------------------------- inner
    def _check_watcher(self) -> None:
        if not self._watching:
            return
        try:
            self.layout.inbox.mkdir(parents=True, exist_ok=True)
            if self.watcher.ensure_alive():
                self._event("watcher_restarted", "inbox watcher was not running; restarted it", level="warning")
        except Exception as e:
            self.state.report_once("watcher_restarted", self.layout.inbox,
                                   f"inbox watcher cannot start ({e}); relying on rescans")

    def _take_hints(self) -> bool:
        woken = False
        while True:
            try:
                self._hint(self.hints.get_nowait())
                woken = True
            except queue.Empty:
                return woken

    def _hint(self, hint: tuple[str, Path]) -> None:
        kind, path = hint
        if kind in ("closed", "moved"):
            self.state.hints.add(path)

    def _scan_and_claim(self) -> list:
        cfg = self.cfg
        candidates = scan_inbox(self.layout, float(cfg.settle_seconds), cfg.ignore_suffixes, self.state)
        self._next_rescan = time.monotonic() + float(cfg.rescan_seconds)
        self._flush_notices()
        jobs, budget_end = [], time.monotonic() + CLAIM_BUDGET_SECONDS
        for cand in candidates:
            if time.monotonic() > budget_end:
                self.state.next_due = 0.0  # the rest are ready: come back at the next poll
                break
            if self._skip_broken(cand):
                continue
            job = self._claim(cand)
            if job is not None:
                jobs.append(job)
        return jobs

    def _skip_broken(self, cand: Candidate) -> bool:
        seen = self.state.seen.get(cand.path)
        broken = self._broken.get(cand.path)
        if broken is None or seen is None:
            return False
        ident, retry_at = broken
        if ident == seen.ident and time.monotonic() < retry_at:
            return True
        del self._broken[cand.path]
        return False

    def _claim(self, cand: Candidate):
        policy = str(getattr(self.cfg, "duplicate_policy", "skip"))
        try:
            job = self.spool.claim(cand.path, cand.adapter, cand.original_name,
                                   duplicates=policy, submitted_at=_iso(cand.first_seen), settled=cand.settled)
        except StillChanging as e:
            # Put back by the claim: a writer is still at it. It is taken whole once it settles again.
            self.state.seen.pop(cand.path, None)
            self._event("file_changing", f"inbox: {show(cand.original_name)} is still being written ({e}); "
                        "it is taken once it settles again", level="warning", path=str(cand.path))
            return None
        except Exception as e:
            seen = self.state.seen.get(cand.path)
            self._broken[cand.path] = (seen.ident if seen else None, time.monotonic() + RETRY_BROKEN_SECONDS)
            self.claim_failures.add(cand.path)
            self.state.report_once("file_rejected", cand.path, f"inbox: cannot take {show(cand.original_name)} "
                                   f"for adapter {cand.adapter}: {type(e).__name__}: {e}; it stays in the inbox",
                                   reason="claim_failed")
            self._flush_notices(level="error")
            return None
        self.state.seen.pop(cand.path, None)
        self.claim_failures.discard(cand.path)
        if job is None:
            return None  # gone before we could take it
        fields = {"job_id": job.id, "adapter": job.adapter, "file": job.original_name}
        name = show(job.original_name)
        if job.state == JobStatus.FAILED:
            self._event("file_rejected", f"job {job.id} failed at once: {show(job.error)}", level="error",
                        reason="symlink", error=job.error, **fields)
        elif job.duplicate_of is not None and job.state == JobStatus.PENDING:
            self._waiting_duplicates = (self._waiting_duplicates or set()) | {job.id}
            self._event("job_queued", f"job {job.id} queued: {name} -> adapter {job.adapter} ({_size(job.size)}, "
                        f"sha256 {job.sha256[:12]}); same bytes as job {job.duplicate_of}, not finished yet: "
                        "skipped if that one succeeds, trained if it fails or is cancelled",
                        sha256=job.sha256, size=job.size, duplicate_of=job.duplicate_of, **fields)
        elif job.duplicate_of is not None:
            self._event("duplicate", f"job {job.id}: {name} is a duplicate of job {job.duplicate_of} (same sha256, "
                        f"adapter {job.adapter}); not trained again", duplicate_of=job.duplicate_of,
                        sha256=job.sha256, **fields)
        else:
            earlier = self.spool.find_by_sha256(job.sha256, job.adapter)
            same = (f"; same bytes as job {earlier.id}, trained again (duplicate_policy={policy})"
                    if earlier is not None and earlier.id != job.id else "")
            self._event("job_queued", f"job {job.id} queued: {name} -> adapter {job.adapter} ({_size(job.size)}, "
                        f"sha256 {job.sha256[:12]}){same}", sha256=job.sha256, size=job.size, **fields)
        return job

    def _settle_duplicates(self) -> list:
        """A pending job whose bytes equal those of an earlier job not yet ended waits for it: once that one is
        done, this one is done too, as its duplicate; once it failed or was cancelled, this one is trained."""
        if self._waiting_duplicates is None:  # first poll: a restart must not forget the waiting ones
            self._waiting_duplicates = {job.id for job, _ in self.spool.list(JobStatus.PENDING)
                                        if job.duplicate_of is not None}
        finished = []
        for job_id in sorted(self._waiting_duplicates):
            found = self.spool.get(job_id)
            if found is None or found[0].state != JobStatus.PENDING or found[0].duplicate_of is None:
                self._waiting_duplicates.discard(job_id)  # cancelled, or taken by someone else's decision
                continue
            job, job_dir = found
            original = self.spool.get(job.duplicate_of)
            ended = original[0].state if original is not None else JobStatus.FAILED
            if ended in (JobStatus.PENDING, JobStatus.RUNNING):
                continue
            self._waiting_duplicates.discard(job_id)
            fields = {"job_id": job.id, "adapter": job.adapter, "file": job.original_name}
            if ended == JobStatus.DONE:
                job.finished_at, job.note = now_iso(), DUPLICATE_NOTE.format(job.duplicate_of)
                self.spool.move(job, JobStatus.DONE)
                self._event("duplicate", f"job {job.id}: {show(job.original_name)} is a duplicate of job "
                            f"{job.duplicate_of} (same sha256, adapter {job.adapter}), which succeeded; not trained "
                            "again", duplicate_of=job.duplicate_of, sha256=job.sha256, **fields)
                finished.append(job)
            else:
                original_id, job.duplicate_of = job.duplicate_of, None
                job.note = f"same bytes as job {original_id}, which failed or was cancelled: trained"
                job.save(job_dir)
                self._event("job_queued", f"job {job.id}: same bytes as job {original_id}, which {ended.value} "
                            "without training them: this one is trained", sha256=job.sha256, **fields)
        return finished

    def _flush_notices(self, level: str | None = None) -> None:
        notices, self.state.notices = self.state.notices, []
        for kind, message, fields in notices:
            lvl = level or ("info" if kind == "file_seen" else "warning")
            self._event(kind, message, level=lvl, **fields)

    def _event(self, kind: str, message: str, level: str = "info", **fields) -> None:
        try:
            self.status.event(kind, message, level=level, **fields)
        except Exception:
            pass  # logging must not stop intake either
