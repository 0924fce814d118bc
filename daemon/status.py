"""What the daemon tells people and machines: status.log, events.jsonl, status.json.

status.log gets one human-readable line per event (made for `tail -f`), also echoed to stdout for
journald; events.jsonl gets the same event as JSON; status.json is an atomic snapshot.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

from . import durable
from .paths import Layout


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusWriter:
    def __init__(self, layout: Layout, echo: bool = True):
        self.layout = layout
        self.echo = echo

    def event(self, kind: str, message: str, level: str = "info", **fields) -> None:
        ts = now_iso()
        line = f"{ts} {level.upper():5} {message}"
        durable.append_line(self.layout.status_log, line)
        record = {"ts": ts, "event": kind, "level": level, "message": message, **fields}
        durable.append_line(self.layout.events, json.dumps(record, default=str, ensure_ascii=False))
        if self.echo:
            print(line, file=sys.stdout, flush=True)

    def snapshot(self, state: dict) -> None:
        durable.write_json(self.layout.status_json, {"updated_at": now_iso(), "updated_unix": time.time(), **state})
