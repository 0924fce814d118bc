"""The daemon's status page, started at the daemon's start: a page that cannot start (its port taken) is a
warning, never a reason not to train."""

from __future__ import annotations

from daemon.paths import Layout


def start(cfg, layout: Layout, status):
    """The running page server, or None (turned off, or it could not start: said in status.log)."""
    web = cfg.status.web
    if not web.enabled:
        return None
    try:
        from daemon.supervisor.web import start_web  # the page's code only when it is turned on

        server = start_web(layout, web.host, web.port, limits=web,
                           report=lambda message: status.event("web", message, level="warning"))
        status.event("web", f"status page at {server.url}", url=server.url)
        return server
    except OSError as e:
        status.event("web", f"status page not started ({web.host}:{web.port}): {e}", level="warning")
        return None
