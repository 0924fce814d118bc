"""Issue 13, rows 1 and 14: a local neighbour against the status page. Idle connections by the hundred (more than
the daemon has descriptors) while a job trains: the job finishes, the daemon lives, the page answers 503 beyond
its bound and 200 once the idle ones time out. Malformed query values are a 400 with a message, never a 500.
"""

from __future__ import annotations

import json
import resource
import socket
import socketserver
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from accounting import Inbox, account, faults, stop, wait_ready
from daemon.config import WebConfig
from daemon.paths import Layout
from daemon.supervisor import web_server
from daemon.supervisor.web import start_web
from helpers import ENTRY, chat_lines, env, events, jobs, wait_for, write_config

DAEMON_FD_LIMIT = 256  # the daemon's RLIMIT_NOFILE here; before the bound, ~250 idle connections killed it
IDLE_CONNECTIONS = 300


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def open_idle(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(n)]


def said_before_closing(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent on this connection until it closed it."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


# ------------------------------------------------------------------ unit: the API's 400s, the server's bound
@pytest.fixture
def page(root):
    reports: list[str] = []
    server = start_web(Layout.at(root), "127.0.0.1", 0, report=reports.append,
                       limits=WebConfig(max_connections=3, idle_timeout_seconds=1, request_timeout_seconds=2))
    server.reports = reports
    yield server
    server.stop()


@pytest.mark.parametrize("query, message", [
    ("/api/jobs?limit=%C2%B2", "limit must be a whole number from 1 to 1000000, not '²'"),
    ("/api/jobs?limit=" + "9" * 5000, "limit must be a whole number from 1 to 1000000, not '99999999999999999999...'"),
    ("/api/jobs?limit=-1", "limit must be a whole number from 1 to 1000000, not '-1'"),
    ("/api/jobs?limit=0", "limit must be a whole number from 1 to 1000000, not '0'"),
    ("/api/jobs?limit=2000000", "limit must be a whole number from 1 to 1000000, not '2000000'"),
    ("/api/jobs?state=lost", "state must be one of pending, running, done, failed, not 'lost'"),
    ("/api/loss?job=%D9%A3", "job must be a whole number from 0 to 1000000000000, not '٣'"),
    ("/api/loss?job=1.5", "job must be a whole number from 0 to 1000000000000, not '1.5'"),
])
def test_a_malformed_query_value_is_a_400_naming_it(page, query, message):
    code, body = get(page.url.rstrip("/") + query)
    assert (code, json.loads(body)) == (400, {"error": message})


def test_well_formed_queries_still_answer(page):
    assert get(page.url + "api/jobs?limit=5&state=done") == (200, b"[]")
    code, body = get(page.url + "api/loss?job=7")
    assert code == 200 and json.loads(body)["train"] == []
    assert get(page.url + "plots/default/v" + "9" * 5000 + ".png")[0] == 404  # was int() of 5,000 digits: a 500


def test_beyond_the_bound_a_503_and_silent_or_dribbling_clients_are_dropped(page):
    idle = open_idle(page.port, 3)
    code, body = get(page.url + "api/status")
    assert code == 503 and body.startswith(b"busy: too many connections")
    assert page.reports == ["status page: 3 connections open, the most it serves (status.web.max_connections, or "
                            "a quarter of the open-file limit); answering 503"]
    assert [said_before_closing(s, 10) for s in idle] == [b""] * 3  # idle_timeout_seconds=1 closed them
    assert get(page.url + "api/status")[0] == 200

    # One byte every half second never trips the idle timeout; the request timeout (2 s) ends it.
    slow = socket.create_connection(("127.0.0.1", page.port), timeout=10)
    started = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for byte in b"GET /api/status HTTP/1.0\r\nHost: 127.0.0.1\r\n" * 10:
            slow.send(bytes([byte]))
            time.sleep(0.5)
    assert 1.5 < time.monotonic() - started < 8
    slow.close()


def test_an_accept_error_is_reported_once_and_the_page_goes_on(page, monkeypatch):
    real, failures = socketserver.TCPServer.get_request, []

    def out_of_descriptors(server):
        if len(failures) < 3:
            failures.append(1)
            raise OSError(24, "Too many open files")
        return real(server)

    monkeypatch.setattr(web_server, "ACCEPT_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(socketserver.TCPServer, "get_request", out_of_descriptors)
    assert get(page.url + "api/status")[0] == 200
    assert len(failures) == 3 and page.reports == [
        "status page: cannot accept connections (Too many open files); it waits and tries again, the daemon goes on"]


def test_the_bound_is_at_most_a_quarter_of_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (128, 4096))
    assert web_server.connection_bound(64) == 32
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert web_server.connection_bound(64) == 64


# ------------------------------------------------------------------ the real daemon under a connection flood
@pytest.mark.slow
def test_idle_connections_beyond_the_fd_limit_cannot_stop_training(root, tiny_model_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 100:  # this test process holds the idle connections itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    write_config(root, tiny_model_dir, status={"progress_every_steps": 1, "web": {"enabled": True, "port": 0}})
    inbox = Inbox(root)
    slow_steps = faults({"point": "train_step", "kind": "sleep", "seconds": 1.0})

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_FD_LIMIT, hard))

    with open(root / "daemon.out", "ab") as out:
        daemon = subprocess.Popen([sys.executable, str(ENTRY), "run", "--root", str(root)], stdout=out,
                                  stderr=subprocess.STDOUT, env=env(TRAINING_DAEMON_FAULTS=slow_steps), cwd=root,
                                  preexec_fn=low_fd_limit)
    try:
        wait_ready(root, daemon)
        url = wait_for(lambda: [e["url"] for e in events(root, "web") if "url" in e], timeout=60,
                       what="the status page")[0]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        inbox.drop("chats.jsonl", chat_lines(40, "plum"))
        wait_for(lambda: events(root, "progress"), timeout=300, what="training to start")

        idle = open_idle(port, IDLE_CONNECTIONS)
        code, body = get(url + "api/status")
        assert code == 503 and body.startswith(b"busy"), (code, body)
        assert [j["folder"] for j in jobs(root)] == ["running"]  # the flood came while the job trained
        steps_during_flood = len(events(root, "progress"))

        # The idle ones are closed after idle_timeout_seconds (10); the page answers again.
        wait_for(lambda: get(url + "api/status")[0] == 200, timeout=120, interval=1, what="the page to answer")
        fates = [said_before_closing(s, 60) for s in idle]
        served = [f for f in fates if not f]
        refused = [f for f in fates if f.startswith(b"HTTP/1.0 503 Service Unavailable")]
        assert len(served) + len(refused) == IDLE_CONNECTIONS, set(fates) - {b""}
        # A quarter of the daemon's 256 descriptors, at most, were the page's at once.
        assert 0 < len(served) <= DAEMON_FD_LIMIT // 4 + 8 and len(refused) >= IDLE_CONNECTIONS - 80

        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done"], timeout=600, interval=1,
                 what="the job to finish")
        assert len(events(root, "progress")) > steps_during_flood and daemon.poll() is None
        account(root, inbox, expect={"chats.jsonl": "done"})
        assert stop(daemon) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
    log = (root / "daemon.out").read_text(errors="replace")
    assert "status page: 64 connections open, the most it serves" in log
    assert "EMFILE" not in log and "Too many open files" not in log and "Traceback" not in log
