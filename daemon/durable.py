"""The one way the daemon writes files: temp file, fsync, rename, fsync of the directory.

A reader (or a restart after kill -9) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_MODE = 0o644  # never world-writable (umask may tighten further)


def forbid_world_writable() -> None:
    """Mask the "others may write" bit for every file and folder this process and its children create.

    Not every file goes through FILE_MODE (trainer.log, the libraries' safetensors and tokenizer files, temp
    folders): with a umask of 000 they would be world-writable, and anyone could swap an adapter's weights.
    """
    os.umask(os.umask(0o022) | 0o002)


def read_json(path: str | os.PathLike, default=None):
    """A JSON file's content, or `default` when it is missing, unreadable or not JSON (a reader of state that a
    writer may not have made yet; durable writes mean it is never half-written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take fewer bytes than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = FILE_MODE) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Copy src to dst durably; returns the sha256 of the bytes copied."""
    import hashlib

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with open(src, "rb") as fin:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            while block := fin.read(chunk):
                digest.update(block)
                write_all(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return digest.hexdigest()


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomic rename, then fsync both parents so the move survives a power cut."""
    os.rename(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)


def swap_symlink(link: str | os.PathLike, target: str) -> None:
    """Point `link` at `target` atomically (a new link renamed over the old one)."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
