"""`training-daemon promote ADAPTER@vN` and `rollback ADAPTER`: daemon/promotion.py moves `latest`; this tells
status.log and events.jsonl, from the user's process (a running daemon need not be asked: a job it starts later
reads latest.json then, and the adapter's lock keeps the move and a publish apart)."""

from __future__ import annotations

from daemon import promotion
from daemon.paths import Layout
from daemon.supervisor.status import StatusWriter


def promote(layout: Layout, spec: str, check_base=None) -> str:
    """check_base(meta, label): raises UserError when the version's base folder now holds another model (the
    CLI passes the trainer's check: this side never loads the training stack)."""
    done = promotion.promote(layout.checkpoints, spec, check_base)
    if done["changed"]:
        _tell(layout, "promoted", done, decision="promoted")
    return done["message"]


def rollback(layout: Layout, adapter: str) -> str:
    done = promotion.rollback(layout.checkpoints, adapter)
    _tell(layout, "rolled_back", done, decision="rolled_back")
    return done["message"]


def _tell(layout: Layout, kind: str, done: dict, decision: str) -> None:
    status = StatusWriter(layout, echo=False)
    try:
        status.event(kind, done["message"], job_id=done.get("job_id"), adapter=done["adapter"],
                     version=done["version"], decision=decision, reason=done.get("reason"),
                     latest=done["version"], was=done.get("was"), by="cli")
    finally:
        status.close()
