"""Times as both processes write them: ISO timestamps in files, durations and ETAs for people."""

from __future__ import annotations

from datetime import datetime, timezone


def now_iso() -> str:
    """UTC, to the second: what job.json, events and error.json record."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fmt_duration(seconds) -> str:
    """42s, 3m 05s, 2h 03m, 1d 04h; "?" when unknown: how long something took or has run."""
    if seconds is None:
        return "?"
    s = max(0, int(round(float(seconds))))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_eta(seconds) -> str:
    """0:42, 3:05, 1:02:03; "?" when unknown: a clock-style countdown for progress lines and systemd's STATUS=."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
