"""`training-daemon submit`: put a file into the inbox as the daemon wants it, or refuse it in one line.

The file is copied under a short hidden temporary name (the daemon ignores dot-files) and hard-linked to its
final name in one step, so the daemon never sees half a file and a file already waiting under that name is
never replaced. What would never become a job is refused before anything is written: anything but a regular
file (reading /dev/zero or a FIFO would never end), a file over intake.max_file_bytes, a name the daemon
ignores. The temporary file is removed whatever happens (a full disk, Ctrl-C).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from pathlib import Path

from daemon import durable
from daemon.paths import DEFAULT_ADAPTER, Layout, UserError, check_adapter_name
from daemon.textsafe import for_terminal

NAME_MAX = 255  # bytes in one file name on Linux file systems
TEMP_PREFIX = ".submit-"  # hidden: the daemon never takes it
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def submit_file(layout: Layout, src: Path, adapter: str, intake_cfg) -> tuple[Path, str]:
    """Copy `src` into the inbox folder of `adapter`; returns (its path there, its sha256)."""
    check_adapter_name(adapter)
    max_bytes = int(intake_cfg.max_file_bytes)
    fd = _open_regular(src, max_bytes)
    try:
        name = src.name
        check_name(name, intake_cfg.ignore_suffixes)
        folder = layout.inbox if adapter == DEFAULT_ADAPTER else layout.inbox / adapter
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            sha = _copy_bounded(fd, tmp, max_bytes, src)
            dest = _link_under_a_free_name(tmp, folder, name)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        os.close(fd)
    durable.fsync_dir(folder)
    return dest, sha


def check_name(name: str, ignore_suffixes) -> None:
    """Refuse a name the inbox scan skips: it would wait there forever, never a job."""
    suffixes = tuple(ignore_suffixes or ())
    if name.startswith(".") or name.endswith(suffixes):
        ignored = ", ".join(suffixes)
        raise UserError(f"{for_terminal(name)}: the daemon ignores files whose name starts with '.' or ends in "
                        f"{ignored} (files still being written); rename it first")


def _open_regular(src: Path, max_bytes: int) -> int:
    """A descriptor on `src` if it is a regular file within the size limit. O_NONBLOCK: opening a FIFO
    must not wait for a writer; fstat then refuses it."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot read {for_terminal(src)}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise UserError(f"{for_terminal(src)} is {what}: only regular files can be submitted")
        if st.st_size > max_bytes:
            raise UserError(f"{for_terminal(src)} is {st.st_size} bytes, over intake.max_file_bytes ({max_bytes})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_bounded(fd: int, tmp: Path, max_bytes: int, src: Path, chunk: int = 1 << 20) -> str:
    """Copy at most max_bytes from fd into tmp (fsynced); a file that grows past the limit is refused."""
    digest, copied = hashlib.sha256(), 0
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, durable.FILE_MODE)
        try:
            while block := os.read(fd, min(chunk, max_bytes + 1 - copied)):
                copied += len(block)
                if copied > max_bytes:
                    raise UserError(f"{for_terminal(src)} grew past intake.max_file_bytes ({max_bytes}) while it "
                                    "was copied; nothing was submitted")
                digest.update(block)
                durable.write_all(out, block)
            os.fsync(out)
        finally:
            os.close(out)
    except OSError as e:
        raise UserError(f"cannot copy {for_terminal(src)} into the inbox after {copied} bytes: "
                        f"{e.strerror or e}; nothing was left there") from None
    return digest.hexdigest()


def _link_under_a_free_name(tmp: Path, folder: Path, name: str) -> Path:
    """Give tmp its final name: `name`, else `name (2)`, ... link() fails where a name is taken, so a file
    already waiting is never replaced."""
    n = 1
    while True:
        dest = folder / (name if n == 1 else _numbered(name, n))
        try:
            os.link(tmp, dest)
            return dest
        except FileExistsError:
            n += 1
        except OSError as e:
            raise UserError(f"cannot put {for_terminal(name)} into {for_terminal(folder)}: {e.strerror or e}") from None


def _numbered(name: str, n: int) -> str:
    """`stem (n).suffix`, the stem shortened so the name stays within NAME_MAX bytes."""
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, dot + suffix) if stem and len(suffix) < 16 else (name, "")
    tail = f" ({n}){suffix}"
    while stem and len(os.fsencode(stem + tail)) > NAME_MAX:
        stem = stem[:-1]
    return stem + tail


def wait_for_job(spool, name: str, sha: str, timeout: float = 3600) -> int:
    """The id of the job the daemon made of the submitted file (for --follow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job, _ in reversed(spool.list()):
            if job.sha256 == sha and job.original_name == name:
                return job.id
        time.sleep(0.5)
    raise UserError("the daemon has not taken the file yet: is `training-daemon run` running on this root?")
