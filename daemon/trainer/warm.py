"""While an early trainer waits for the GPU: read the base model's weight files into the page cache.

Loading after the go then reads memory instead of the disk (a 1.5B bf16 base is 3 GB: seconds from a cold
disk, a fraction of one from the cache). Only the files, no tensor and no CUDA: the waiting trainer holds
no GPU memory and no context (never two trainers on the GPU). A background thread, so that the go is acted on
at once; it stops at the go (loading reads the rest itself) or when it has read everything.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CHUNK = 16 << 20

# What from_pretrained reads the weights from; the .bin files only where there are no safetensors.
WEIGHTS = ("*.safetensors", "*.bin")


def weight_files(base_dir: Path) -> list[Path]:
    for pattern in WEIGHTS:
        found = sorted(p for p in base_dir.glob(pattern) if p.is_file())
        if found:
            return found
    return []


class Warmer:
    """Reads `files` once, in a thread: posix_fadvise(WILLNEED) asks the kernel to start on each whole file, a
    sequential read makes sure (the advice is only advice). Stopped by stop(); its figures say how far it got."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.bytes_read = 0
        self.seconds = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="warm-base")

    @classmethod
    def start(cls, base_dir: Path) -> "Warmer":
        warmer = cls(weight_files(base_dir))
        warmer._thread.start()
        return warmer

    def _run(self) -> None:
        t0 = time.monotonic()
        buf = bytearray(CHUNK)
        try:
            for path in self.files:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
                    while not self._stop.is_set():
                        n = f.readinto(buf)
                        if not n:
                            break
                        self.bytes_read += n
                if self._stop.is_set():
                    break
        except OSError as e:  # the loader will meet it too, and say it there: this is only a head start
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.seconds = time.monotonic() - t0

    def stop(self) -> str:
        """Stop reading; what was done, in words (for a log event)."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        total = sum(p.stat().st_size for p in self.files if p.exists())
        done = "all" if self.bytes_read >= total else f"{self.bytes_read / 2**30:.2f} GiB of"
        text = (f"base model files read ahead while waiting for the GPU: {done} {total / 2**30:.2f} GiB "
                f"({len(self.files)} file(s)) in {self.seconds:.1f} s")
        return text + (f"; stopped by {self.error}" if self.error else "")
