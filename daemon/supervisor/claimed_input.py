"""The input of a claimed job: exactly the bytes that were hashed.

A claim renames the inbox file into the job folder, so nobody can open it by name any more. What could still
change it: a writer that kept it open (it paused longer than settle_seconds), or a hard link outside the inbox.
So a file with another link is replaced by a private copy, and the hash is taken only if the file is still
what the inbox scan saw settle and does not change while it is read; otherwise StillChanging puts it back to
settle again. A writer that appends after the hash is caught by the trainer, which checks the sha256 of
input.jsonl against job.json before it trains.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path

from daemon import durable


def copy_across_filesystems(src: Path, dst: Path) -> None:
    """A filesystem mounted inside the inbox: copy, then let go of the original (links stay links)."""
    info = os.lstat(src)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(info.st_mode):
        durable.copy_file(src, dst)
    else:
        raise OSError(errno.EINVAL, f"not a regular file: {src}")
    os.unlink(src)
    durable.fsync_dir(dst.parent)


class StillChanging(Exception):
    """The file changed after the inbox scan saw it settle, or while it was hashed: a writer is still at it."""


def unshare(path: Path, settled: tuple[int, int] | None) -> bool:
    """A regular file with another hard link (a twin outside the inbox) is replaced by a private copy, so that
    editing the twin later cannot change what the job trains; True if it was. A twin that differs from what
    the scan saw settle, or is edited during the copy: StillChanging."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return False  # a symlink is kept unread (_complete)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if before.st_nlink <= 1:
            return False
        if settled is not None and tuple(settled) != _ident(before):
            raise StillChanging(f"it changed after it settled ({settled[0]} B, then {before.st_size} B)")
        private = path.with_name(".input.private")
        with open(fd, "rb", closefd=False) as fin, open(private, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        if _ident(os.fstat(fd)) != _ident(before) or private.stat().st_size != before.st_size:
            private.unlink()
            raise StillChanging(f"its hard-linked twin changed while it was copied ({before.st_size} B)")
        os.replace(private, path)  # drops only our link: the twin outside keeps its bytes
        durable.fsync_dir(path.parent)
        return True
    finally:
        os.close(fd)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def hash_and_sync(path: Path, settled: tuple[int, int] | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
    """sha256 and size of a file, and fsync it: the user may never have, and the job must not outlive its bytes.
    The file must not change while it is read, nor differ from the (size, mtime_ns) the scan saw settle."""
    digest = hashlib.sha256()
    # O_NOFOLLOW | O_NONBLOCK: whatever is there now, never follow a link or hang on a FIFO.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        before = _ident(os.fstat(fd))
        size = 0
        while block := os.read(fd, chunk):
            digest.update(block)
            size += len(block)
        os.fsync(fd)
        after = _ident(os.fstat(fd))
    finally:
        os.close(fd)
    if before != after or size != after[0]:
        raise StillChanging(f"it changed while it was read ({before[0]} B, then {after[0]} B)")
    if settled is not None and tuple(settled) != after:
        raise StillChanging(f"it changed after it settled ({settled[0]} B, then {after[0]} B)")
    return digest.hexdigest(), size
