"""The queue: job folders under queue/<state>/ moved between states by atomic rename.

A claim builds the job under a temporary name (queue/<state>/.claim-j000042) and renames it into place
only when it is complete, so a crash leaves one of: the file still in the inbox, a complete job, or a
`.claim-*` folder that sweep() finishes at the next start. The folder a job is in is the truth for its
state; job.json is rewritten before each move so it is never behind on anything else. A job folder whose
job.json cannot be read is never left out of a listing: it is listed as a stand-in (Job.unreadable says why,
unreadable.py), and only the daemon sets it aside (set_aside()).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from daemon import durable, faults
from daemon.paths import Layout
from daemon.config import LimitsConfig
from daemon.supervisor import unreadable
from daemon.supervisor.claimed_input import copy_across_filesystems, unshare
from daemon.supervisor.claimed_input import hash_and_sync as _hash_and_sync  # a name tests replace
from daemon.supervisor.job import INPUT, Job, JobStatus, ManifestError, dir_name, parse_dir_name
from daemon.supervisor.outcome import Outcome, OutcomeKind
from daemon.supervisor.policy import decide
from daemon.timefmt import now_iso

CLAIM_PREFIX = ".claim-"
# A symlink dropped in the inbox is kept under this name, never as input.jsonl: a retry of its failed
# job must not make the trainer follow the link.
SYMLINK_INPUT = "input.symlink"
DUPLICATE_NOTE = "duplicate of job {} (same sha256); not trained again"
RESTART_REASON = "daemon restarted while the job was running; it resumes from its last checkpoint"


class Spool:
    def __init__(self, layout: Layout):
        self.layout = layout
        # (sha256, adapter) per job id: both never change and ids are never reused, so this never goes stale.
        self._digests: dict[int, tuple[str | None, str]] = {}
        self._unmovable: set[int] = set()  # unreadable jobs set_aside() failed to move, already reported

    def make_folders(self) -> None:
        """queue/<state>/ for every state: the states are the spool's, so it makes their folders before it writes."""
        for state in JobStatus:
            self.layout.state_dir(state).mkdir(mode=0o755, parents=True, exist_ok=True)

    # ------------------------------------------------------------------ ids
    def next_id(self) -> int:
        """A fresh job id, persisted before it is used so that no crash can hand it out twice."""
        try:
            stored = int(self.layout.counter.read_text().strip())
        except (OSError, ValueError):
            stored = 1
        # The folders also bound it from below: a lost or restored counter file cannot reuse an id.
        candidate = max(stored, self._highest_id() + 1, 1)
        self.layout.counter.parent.mkdir(parents=True, exist_ok=True)
        durable.write_text(self.layout.counter, f"{candidate + 1}\n")
        return candidate

    def _highest_id(self) -> int:
        highest = 0
        for state in JobStatus:
            for name in _names(self.layout.state_dir(state)):
                job_id = parse_dir_name(name.removeprefix(CLAIM_PREFIX))
                if job_id is not None:
                    highest = max(highest, job_id)
        return highest

    # ---------------------------------------------------------------- claim
    def claim(self, src: Path, adapter: str, original_name: str, *, duplicates: str = "train",
              submitted_at: str | None = None, settled: tuple[int, int] | None = None) -> Job | None:
        """Move the file `src` into a new job; None if it vanished first.

        duplicates="skip": if a done job of this adapter has the same sha256, the new job is completed straight
        into done/ with duplicate_of set (in the same atomic step, so a crash cannot leave it queued for
        training); if that job is still pending or running, the new one waits in pending with duplicate_of set
        and Intake settles it once the original ends. A symlink becomes a failed job holding the link itself, unread.
        settled: the (size, mtime_ns) the inbox scan saw settle; a file that differs, or changes while it is
        hashed, is put back (StillChanging) to settle again. A file with another hard link becomes a private copy.
        """
        src = Path(src)
        job = Job(id=self.next_id(), adapter=adapter, original_name=original_name,
                  submitted_at=submitted_at or now_iso())
        self.make_folders()
        tmp = self.layout.state_dir(JobStatus.PENDING) / (CLAIM_PREFIX + job.dir_name)
        tmp.mkdir(mode=0o755)
        # The manifest goes first so a crash after the move below still knows the adapter and the name.
        job.save(tmp)
        copied = False
        try:
            durable.rename(src, tmp / INPUT)
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        except OSError as e:
            try:
                if e.errno != errno.EXDEV:
                    raise
                copy_across_filesystems(src, tmp / INPUT)
                copied = True
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        try:
            faults.check("claim", job_id=job.id)  # the bytes are in the half-made job folder
            if copied or unshare(tmp / INPUT, settled):
                settled = None  # a copy has an mtime of its own: the source was checked against it instead
            return self._complete(tmp, job, duplicates, settled)
        except BaseException:
            self._give_back(tmp, src)
            raise

    def _complete(self, tmp: Path, job: Job, duplicates: str, settled: tuple[int, int] | None = None) -> Job:
        """Hash the input (from inside the job folder, so nobody can swap it), decide the state, rename into place."""
        info = os.lstat(tmp / INPUT)
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(tmp / INPUT)
            os.rename(tmp / INPUT, tmp / SYMLINK_INPUT)
            job.state, job.finished_at = JobStatus.FAILED, now_iso()
            job.error = f"symlinks are not followed: {job.original_name} -> {target}"
        elif not stat.S_ISREG(info.st_mode):
            job.state, job.finished_at = JobStatus.FAILED, now_iso()
            job.error = f"not a regular file: {job.original_name}"
        else:
            job.sha256, job.size = _hash_and_sync(tmp / INPUT, settled)
            self._digests[job.id] = (job.sha256, job.adapter)
            original = self.find_by_sha256(job.sha256, job.adapter) if duplicates == "skip" else None
            if original is not None and original.state == JobStatus.DONE:
                job.state, job.finished_at, job.duplicate_of = JobStatus.DONE, now_iso(), original.id
                job.note = DUPLICATE_NOTE.format(original.id)
            elif original is not None:  # trained only if the original does not succeed (cancelled, failed)
                job.duplicate_of = original.id
                job.note = f"same bytes as job {original.id}, not finished yet: skipped if it succeeds"
        job.queued_at = now_iso()
        job.save(tmp)
        durable.rename(tmp, self.layout.state_dir(job.state) / job.dir_name)
        return job

    def _give_back(self, tmp: Path, src: Path) -> None:
        """A claim that failed half-way (disk full, permissions) puts the file back if its name is free."""
        try:
            if not os.path.lexists(src):
                os.rename(tmp / INPUT, src)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # the bytes stay safe in the .claim folder; sweep() completes it at the next start

    # ------------------------------------------------------------ lookups
    def job_dir(self, job: Job) -> Path:
        """Where the job's folder is now (searching every state), or where its state says it would be."""
        for state in (job.state, *(s for s in JobStatus if s != job.state)):
            path = self.layout.state_dir(state) / job.dir_name
            if path.is_dir():
                return path
        return self.layout.state_dir(job.state) / job.dir_name

    def get(self, job_id: int) -> tuple[Job, Path] | None:
        """The job and its folder (a stand-in if its job.json cannot be read), or None if there is no such job."""
        # Another process (the CLI, the status page) can scan while the daemon moves the job back to a state
        # already looked at: a second pass finds it, as one rename cannot hide it twice.
        for _ in range(2):
            for state in JobStatus:
                path = self.layout.state_dir(state) / dir_name(job_id)
                job = _read(path, state)
                if job is not None:
                    return job, path
        return None

    def list(self, state: JobStatus | str | None = None) -> list[tuple[Job, Path]]:
        """Every job (of one state), by id; one whose job.json cannot be read as a stand-in, never left out."""
        states = tuple(JobStatus) if state is None else (JobStatus(state),)
        for _ in range(2):  # a folder moved away mid-scan, perhaps to a state already scanned: scan again
            found: dict[int, tuple[Job, Path]] = {}
            moved = False
            for s in states:
                folder = self.layout.state_dir(s)
                for name in _names(folder):
                    if parse_dir_name(name) is None:
                        continue
                    job = _read(folder / name, s)
                    if job is None:
                        moved = moved or not os.path.lexists(folder / name)
                    elif job.unreadable is None or job.id not in found:
                        found[job.id] = (job, folder / name)  # seen twice while being moved: the later state wins
            if not moved:
                break
        return [found[job_id] for job_id in sorted(found)]

    def ids(self, state: JobStatus | str) -> list[int]:
        """The ids of the jobs in a state, without reading any job.json (cheap enough for every snapshot)."""
        return [i for i in map(parse_dir_name, _names(self.layout.state_dir(JobStatus(state)))) if i is not None]

    def count(self, state: JobStatus | str) -> int:
        return len(self.ids(state))

    def find_by_sha256(self, sha: str, adapter: str) -> Job | None:
        """The earliest done, pending or running job of `adapter` whose input has this sha256."""
        matches = []
        for state in (JobStatus.DONE, JobStatus.PENDING, JobStatus.RUNNING):
            folder = self.layout.state_dir(state)
            for name in _names(folder):
                job_id = parse_dir_name(name)
                if job_id is None:
                    continue
                if job_id not in self._digests:
                    job = _load(folder / name)
                    if job is None:
                        continue
                    self._digests[job_id] = (job.sha256, job.adapter)
                if self._digests[job_id] == (sha, adapter):
                    matches.append(job_id)
        for job_id in sorted(matches):
            found = self.get(job_id)
            if found is not None and found[0].state != JobStatus.FAILED:
                return found[0]
        return None

    # --------------------------------------------------------------- moves
    def move(self, job: Job, to_state: JobStatus | str) -> Path:
        """Save the job (with its new state) and rename its folder into queue/<to_state>/."""
        to_state = JobStatus(to_state)
        self.make_folders()
        src = self.job_dir(job)
        dst = self.layout.state_dir(to_state) / job.dir_name
        job.state = to_state
        # job.json first: a crash before the rename leaves the job in its old folder (the truth) with a
        # manifest that is otherwise up to date.
        job.save(src)
        if src != dst:
            durable.rename(src, dst)
        return dst

    def set_aside_unreadable(self, jobs: list[tuple[Job, Path]]) -> tuple[list[tuple[Job, Path]], list[Job]]:
        """For the daemon: set aside every stand-in among `jobs`. Returns the readable rest, and the jobs to report:
        each one set aside, and once, each one that could not be moved (left where it is, its error saying why)."""
        readable, report = [], []
        for job, path in jobs:
            if job.unreadable is None:
                readable.append((job, path))
                continue
            try:
                report.append(self.set_aside(job))
            except OSError as e:
                if job.id not in self._unmovable:
                    self._unmovable.add(job.id)
                    job.error = f"{job.unreadable}, and it cannot be moved to queue/failed/: {e}"
                    report.append(job)
        return readable, report

    def set_aside(self, job: Job) -> Job:
        """The daemon's answer to a stand-in: keep the unreadable manifest as job.json.unreadable, write one
        rebuilt from what is unambiguous (unreadable.rebuild) and move the folder, input and all, to failed/."""
        src = self.job_dir(job)
        rebuilt = unreadable.rebuild(self.layout, src, job)
        if (src / unreadable.MANIFEST).is_file():
            # A copy, not a rename: job.json is replaced in one step below, so no reader finds the folder without one.
            durable.copy_file(src / unreadable.MANIFEST, src / unreadable.KEPT_MANIFEST)
        self.move(rebuilt, JobStatus.FAILED)
        return rebuilt

    # --------------------------------------------------------------- sweep
    def sweep(self, max_attempts: int, keep: set[int] | frozenset[int] = frozenset()) -> list[str]:
        """Startup repair: finish half-made claims, send jobs of a dead daemon back to pending
        (or to failed after max_attempts failed or interrupted attempts). Returns what it did, in words.
        `keep`: running jobs to leave alone (their trainer outlived the daemon and was re-attached: Slurm)."""
        self.make_folders()  # an empty queue still shows its four folders
        lines = self._finish_claims()
        for job, _path in self.list(JobStatus.RUNNING):
            if job.unreadable or job.id in keep:
                continue  # an unreadable one: the daemon sets it aside (set_aside) and reports it as an error
            now = now_iso()
            last = job.attempts[-1] if job.attempts else None
            if last is not None and not last.get("outcome"):
                last.update(ended_at=now, outcome=OutcomeKind.INTERRUPTED, error=RESTART_REASON)
            else:  # died before the attempt was written down: count it anyway, or a crash could loop forever
                job.attempts.append({"n": len(job.attempts) + 1, "started_at": None, "ended_at": now,
                                     "outcome": OutcomeKind.INTERRUPTED, "error": RESTART_REASON, "exit_code": None,
                                     "micro_batch_size": job.micro_batch_size})
            decision = decide(Outcome(OutcomeKind.INTERRUPTED, RESTART_REASON), job.attempts,
                              LimitsConfig(max_attempts=max_attempts))
            decision.apply_to(job, now)
            self.move(job, decision.state)
            if decision.state == JobStatus.FAILED:
                lines.append(f"job {job.id} ({job.original_name}) failed: interrupted or failed "
                             f"{decision.counted} times (max_attempts={max_attempts}); not retried again")
            else:
                lines.append(f"job {job.id} ({job.original_name}) back to pending: {RESTART_REASON} "
                             f"(attempt {decision.counted} of {max_attempts} used)")
        return lines

    def _finish_claims(self) -> list[str]:
        lines = []
        for state in JobStatus:
            folder = self.layout.state_dir(state)
            for name in _names(folder):
                if not name.startswith(CLAIM_PREFIX) or not (folder / name).is_dir():
                    continue
                tmp = folder / name
                has_input = os.path.lexists(tmp / INPUT) or os.path.lexists(tmp / SYMLINK_INPUT)
                if not has_input:
                    # Crashed before the file moved: it is still in the inbox and is claimed again.
                    shutil.rmtree(tmp, ignore_errors=True)
                    lines.append(f"removed an empty half-made job folder {state}/{name}")
                    continue
                lines.append(self._recover_claim(tmp, JobStatus(state)))
        return lines

    def _recover_claim(self, tmp: Path, state: JobStatus) -> str:
        try:
            job = Job.load(tmp)
        except (OSError, ValueError, TypeError):
            job_id = parse_dir_name(tmp.name.removeprefix(CLAIM_PREFIX)) or self.next_id()
            job = Job(id=job_id, adapter="default", original_name=INPUT, submitted_at=None,
                      note="recovered after a crash during intake: the original file name and adapter were lost")
        if (tmp / SYMLINK_INPUT).is_symlink() and not os.path.lexists(tmp / INPUT):
            job.state, job.finished_at = JobStatus.FAILED, job.finished_at or now_iso()
            target = os.readlink(tmp / SYMLINK_INPUT)
            job.error = job.error or f"symlinks are not followed: {job.original_name} -> {target}"
            job.save(tmp)
            durable.rename(tmp, self.layout.state_dir(job.state) / job.dir_name)
        else:
            # A duplicate decided before the crash stays one; otherwise it is queued like any new file.
            policy = "skip" if job.duplicate_of is not None else "train"
            job.state, job.duplicate_of = (JobStatus.PENDING if state == JobStatus.RUNNING else state), None
            job = self._complete(tmp, job, duplicates=policy)
        return f"completed job {job.id} ({job.original_name}) left half-made by a crash during intake: now {job.state}"


def _names(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it]
    except FileNotFoundError:
        return []


def _load(path: Path) -> Job | None:
    try:
        return Job.load(path)
    except (OSError, ValueError, TypeError):
        return None  # not a job folder, or one without a readable manifest


def _read(path: Path, state: JobStatus) -> Job | None:
    """The job in the folder `path` of queue/<state>/; a stand-in if its job.json cannot be read; None if there
    is no such folder (moved away meanwhile, or a stray file)."""
    try:
        return Job.load(path)
    except ManifestError as e:
        reason = str(e)
    except FileNotFoundError:
        if not path.is_dir():
            return None
        reason = "job.json is missing"
    except NotADirectoryError:
        return None
    except OSError as e:
        reason = f"job.json cannot be opened: {e.strerror or e}"
    return unreadable.stand_in(parse_dir_name(path.name), state, reason)
