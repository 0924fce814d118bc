"""The status page, a JSON API and Prometheus /metrics, served by the daemon in a background thread.

Every answer is read from the files the daemon writes (status.json, the spool's job.json, events.jsonl,
checkpoints/*/v*/metadata.json) at request time, so nothing here can go stale or disagree with
`training-daemon status`, and a slow browser cannot slow the daemon down. Read-only; bound to 127.0.0.1
by default, where requests must also name a loopback Host (no DNS-rebinding reads from web pages).

Routes: /  /api/status  /api/jobs[?state=&limit=]  /api/versions  /api/adapters  /api/loss[?job=ID]  /metrics
        /plots/<adapter>/v<N>.png
A query value that is not what the route takes is a 400 naming the parameter and what it accepts. The server
itself (daemon/supervisor/web_server.py) bounds connections and their time, so the page cannot starve the daemon.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from daemon.config import WebConfig
from daemon.durable import read_json
from daemon.paths import ADAPTER_NAME, Layout
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import Spool
from daemon.supervisor.web_metrics import FileCollector
from daemon.supervisor.web_page import PAGE
from daemon.supervisor.web_server import BoundedHTTPServer, BoundedHTTPServer6, serve
from daemon.version_states import adapter_state, annotate_jobs, page_view, summary
from daemon.versions import problems, read_metadata, versions

MAX_POINTS = 2000  # per series in one /api/loss answer; longer runs are thinned evenly
MAX_LIMIT = 1_000_000  # /api/jobs?limit=: more jobs than any spool holds
MAX_JOB_ID = 10**12
# ASCII digits only: str.isdigit() also accepts "²" and "٣", and int() refuses numbers of more than 4,300 digits.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,13}", re.ASCII)
_PLOT = re.compile(r"/plots/([^/]+)/v([0-9]{1,9})\.png", re.ASCII)
VERSION_FIELDS = ("adapter", "version", "job_id", "source_file", "base_model", "steps", "epochs", "first_train_loss",
                  "final_train_loss", "eval_loss", "tokens_trained", "examples_trained", "training_seconds",
                  "finished_at", "device", "peak_gpu_mem_gib", "gpu_peak_card_gib", "parent_version", "mode", "method")


def list_versions(layout: Layout) -> list[dict]:
    out = []
    if not layout.checkpoints.is_dir():
        return out
    for adapter_dir in sorted(layout.checkpoints.iterdir()):
        if not adapter_dir.is_dir() or not ADAPTER_NAME.match(adapter_dir.name):
            continue
        state = adapter_state(adapter_dir)
        for v in reversed(versions(adapter_dir)):
            try:
                meta = read_metadata(adapter_dir, v)
            except (OSError, ValueError):
                continue
            row = {k: meta.get(k) for k in VERSION_FIELDS}
            verdict = state["decisions"].get(v) or {}
            row.update(adapter=adapter_dir.name, version=v, latest=v == state["latest"], held=v in state["held"],
                       decision=verdict.get("decision") if verdict.get("judged") else None,
                       reason=verdict.get("reason"),
                       loss_plot_url=f"/plots/{adapter_dir.name}/v{v}.png" if meta.get("loss_plot") else None,
                       damaged=problems(adapter_dir / f"v{v}", digests=False))  # names and sizes: cheap per request
            out.append(row)
    return out


def _thin(points: list, limit: int = MAX_POINTS) -> list:
    if len(points) <= limit:
        return points
    stride = len(points) / (limit - 1)
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


class LossIndex:
    """Loss points per job, read incrementally from events.jsonl (and from the start of a rotated one)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ident, self.offset, self.partial = None, 0, b""
        self.jobs: dict[int, dict] = {}
        self.last_job: int | None = None
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) != self.ident or st.st_size < self.offset:
                self.ident, self.offset, self.partial = (st.st_dev, st.st_ino), 0, b""
            if st.st_size == self.offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(st.st_size - self.offset)
            self.offset += len(data)
            *lines, self.partial = (self.partial + data).split(b"\n")
            for line in lines:
                # Most events are not about loss: skip them before paying for json.loads.
                if b'"progress"' in line or b'"eval"' in line or b'"job_started"' in line:
                    self._add(line)

    def _add(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            job_id = ev.get("job_id")
        except (ValueError, AttributeError):
            return
        if job_id is None:
            return
        job = self.jobs.setdefault(job_id, {"train": [], "eval": [], "total_steps": None})
        self.last_job = job_id
        kind = ev.get("event")
        if kind == "progress" and ev.get("step") is not None and ev.get("loss") is not None:
            _add_point(job["train"], ev["step"], ev["loss"])
            job["total_steps"] = ev.get("total_steps") or job["total_steps"]
        elif kind == "eval" and ev.get("step") is not None and ev.get("eval_loss") is not None:
            _add_point(job["eval"], ev["step"], ev["eval_loss"])

    def points(self, job_id: int | None) -> dict:
        self.refresh()
        with self.lock:
            job_id = self.last_job if job_id is None else job_id
            job = self.jobs.get(job_id)
            if job is None:
                return {"job_id": job_id, "train": [], "eval": [], "total_steps": None, "source": None}
            return {"job_id": job_id, "train": _thin(job["train"]), "eval": _thin(job["eval"]),
                    "total_steps": job["total_steps"], "source": "events"}


def _add_point(series: list, step, value) -> None:
    # A resumed job repeats steps from its last checkpoint: the new run replaces the old tail.
    while series and series[-1][0] >= step:
        series.pop()
    series.append([step, value])
    if len(series) > 8 * MAX_POINTS:  # bound memory on very long runs: drop every other point
        del series[1:-1:2]


def loss_from_metadata(layout: Layout, job_id: int) -> dict | None:
    """A finished job's curve from its version's metadata, when events.jsonl no longer has it."""
    for row in list_versions(layout):
        if row.get("job_id") == job_id:
            meta = read_metadata(layout.checkpoints / row["adapter"], row["version"])
            return {"job_id": job_id, "train": _thin(meta.get("loss_history") or []),
                    "eval": _thin(meta.get("eval_history") or []), "total_steps": meta.get("steps"),
                    "source": "metadata"}
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class BadQuery(ValueError):
    """A query value the route cannot take: answered 400 with this message."""


def whole_number(query: dict, name: str, low: int, high: int) -> int | None:
    """query[name] as an int in [low, high], None when absent; BadQuery for anything else."""
    text = query.get(name)
    if text is None:
        return None
    if not _WHOLE_NUMBER.fullmatch(text) or not low <= int(text) <= high:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise BadQuery(f"{name} must be a whole number from {low} to {high}, not {shown!r}")
    return int(text)


def one_of(query: dict, name: str, allowed: list[str]) -> str | None:
    text = query.get(name)
    if text is not None and text not in allowed:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise BadQuery(f"{name} must be one of {', '.join(allowed)}, not {shown!r}")
    return text


class _Handler(BaseHTTPRequestHandler):
    server_version = "training-daemon"
    layout: Layout
    spool: Spool
    index: LossIndex
    registry = None
    check_host = True

    def log_message(self, *args) -> None:  # requests are not daemon events: keep them out of the journal
        pass

    def do_GET(self) -> None:
        try:
            if self.check_host and not _is_loopback(urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""):
                return self._send(403, "text/plain", b"forbidden: this page answers to localhost only\n")
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            route = url.path.rstrip("/") or "/"
            if route == "/":
                return self._send(200, "text/html; charset=utf-8", PAGE.encode())
            if route == "/api/status":  # with each adapter's latest, newest and held versions, as `status --json`
                return self._json({**(read_json(self.layout.status_json) or {}),
                                   "adapters": summary(self.layout.checkpoints)})
            if route == "/api/jobs":
                state = one_of(query, "state", [s.value for s in JobStatus])
                limit = whole_number(query, "limit", 1, MAX_LIMIT)
                jobs = [job.to_dict() for job, _ in self.spool.list() if state in (None, job.state.value)]
                return self._json(annotate_jobs(self.layout.checkpoints, jobs[-limit:] if limit else jobs))
            if route == "/api/adapters":
                return self._json(page_view(self.layout.checkpoints))
            if route == "/api/versions":
                return self._json(list_versions(self.layout))
            if route == "/api/loss":
                return self._json(self._loss(whole_number(query, "job", 0, MAX_JOB_ID)))
            if route == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                return self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
            m = _PLOT.fullmatch(route)
            if m and ADAPTER_NAME.match(m.group(1)) and ".." not in m.group(1):
                png = self.layout.checkpoints / m.group(1) / f"v{int(m.group(2))}" / "loss.png"
                if png.is_file():
                    return self._send(200, "image/png", png.read_bytes())
            return self._send(404, "application/json", b'{"error": "not found"}')
        except BadQuery as e:
            self._json({"error": str(e)}, 400)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception as e:  # one bad request must not take the page down
            try:
                self._json({"error": f"{type(e).__name__}: {e}"}, 500)
            except OSError:
                pass

    def _loss(self, job_id: int | None) -> dict:
        if job_id is None:
            cur = (read_json(self.layout.status_json) or {}).get("current") or {}
            job_id = cur.get("job_id")
        answer = self.index.points(job_id)
        if not answer["train"] and job_id is not None:
            answer = loss_from_metadata(self.layout, job_id) or answer
        return answer

    def _json(self, obj, code: int = 200) -> None:
        self._send(code, "application/json", json.dumps(obj, default=str).encode())

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)


class WebServer:
    def __init__(self, httpd: BoundedHTTPServer, host: str):
        self.httpd = httpd
        self.port: int = httpd.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)
        self.url = f"http://{shown}:{self.port}/"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=serve, args=(httpd, self.stopping), name="status-web", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_web(layout: Layout, host: str = "127.0.0.1", port: int = 0, *, limits: WebConfig | None = None,
              report: Callable[[str], None] | None = None) -> WebServer:
    """Serve the status page for `layout` on host:port (0 = any free port); returns once it listens.

    limits: the connection bound and timeouts (status.web in the config; its defaults when None). report: how
    the server tells of a problem it survives (EMFILE on accept, a full house), once each; stderr when None.
    """
    from prometheus_client import CollectorRegistry

    spool = Spool(layout)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FileCollector(spool))
    handler = type("Handler", (_Handler,), {"layout": layout, "spool": spool, "index": LossIndex(layout.events),
                                            "registry": registry, "check_host": _is_loopback(host or "0.0.0.0")})
    limits = limits or WebConfig()
    server_cls = BoundedHTTPServer6 if ":" in host else BoundedHTTPServer
    httpd = server_cls((host, port), handler, max_connections=limits.max_connections,
                       idle_timeout=limits.idle_timeout_seconds, request_timeout=limits.request_timeout_seconds,
                       report=report)
    return WebServer(httpd, host)
