"""What a command says when it fails in a way nobody planned for: one line, and where the traceback went.

A user who runs `training-daemon ...` gets `Error: <what> (full traceback in FILE ...)` on stderr and exit 1,
never a screen of Python; the traceback is kept in a private file for the bug report, and
TRAINING_DAEMON_DEBUG=1 lets it through unchanged (for a developer, or a test that wants to see it).
"""

from __future__ import annotations

import os
import tempfile
import traceback

DEBUG_ENV = "TRAINING_DAEMON_DEBUG"
_LIMIT = 300  # characters of the exception's text: a message that quotes a whole value stays a line


def one_line_error(e: BaseException) -> str:
    """The exception in one line: an OS error as its reason and file, anything else as its type and first line."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": {os.fsdecode(e.filename)}" if e.filename is not None else "")
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= _LIMIT else text[: _LIMIT - 3] + "..."


def traceback_hint(e: BaseException) -> str:
    """Writes the traceback to a private temp file and says where it is (and how to see it printed instead)."""
    try:
        fd, path = tempfile.mkstemp(prefix="training-daemon-error-", suffix=".txt")  # mode 0600
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write("".join(traceback.format_exception(e)))
        return f"full traceback in {path}; {DEBUG_ENV}=1 prints it"
    except Exception:  # noqa: BLE001 - out of memory or disk: the one line must still come out
        return f"run with {DEBUG_ENV}=1 to see the traceback"
