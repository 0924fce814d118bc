"""The status page's HTTP server, bounded so that no local neighbour can use it to take the daemon down.

Each connection is served by a thread, at most `max_connections` at once, and never more than a quarter of
the process's open-file limit, so the daemon's own files, pipes and its trainer always have descriptors left.
One connection beyond the bound gets a 503 at once from the accepting thread and is closed. A connection
silent for `idle_timeout_seconds` (reading or writing) is closed, and so is one not answered
`request_timeout_seconds` after it was accepted (a client that sends one byte every few seconds). An error
on accept (EMFILE, ENFILE, ENOBUFS) or a thread that cannot start is reported (once a minute at most, so a
flood cannot flood the log too) and the server goes on.
The daemon's main loop never waits on this thread: the page can stall or fail, the queue still moves.
"""

from __future__ import annotations

import errno
import resource
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Callable

BUSY_BODY = b"busy: too many connections to the status page, retry in a few seconds\n"
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 5\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)
# A refused connection is kept half-closed this long, so that a request it already sent is read rather than
# answered by a TCP reset (which can make the client lose the 503 it was sent).
LINGER_SECONDS = 2.0
# After a failed accept the listener is still readable: without a pause the loop would spin on the error.
ACCEPT_BACKOFF_SECONDS = 0.5
REPORT_EVERY_SECONDS = 60.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def connection_bound(wanted: int) -> int:
    """`wanted`, or a quarter of RLIMIT_NOFILE when that is less (lingering refusals can take as many again)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 4))


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung browser connection never blocks the daemon's exit
    request_queue_size = 128  # the listen backlog: a burst waits for accept() instead of SYN retries of 1-3 s

    def __init__(self, address, handler, *, max_connections: int, idle_timeout: float, request_timeout: float,
                 report: Callable[[str], None] | None = None):
        self.max_connections = connection_bound(max_connections)
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.report = report or _to_stderr
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}  # connections being served -> when they must be done
        self._lingering: list[tuple[socket.socket, float]] = []  # refused ones; touched by the serving thread only
        self._reported: dict[str, float] = {}  # what -> when it was last reported
        super().__init__(address, handler)

    def report_problem(self, what: str, message: str) -> None:
        """Report `what` unless it was reported less than REPORT_EVERY_SECONDS ago."""
        now = time.monotonic()
        if now - self._reported.get(what, -REPORT_EVERY_SECONDS) >= REPORT_EVERY_SECONDS:
            self._reported[what] = now
            try:
                self.report(message)
            except Exception:  # noqa: BLE001 - telling about a problem must not become one
                pass

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as e:
            if e.errno in _RESOURCE_ERRORS:
                self.report_problem("accept", f"status page: cannot accept connections ({e.strerror}); it waits "
                                    "and tries again, the daemon goes on")
                time.sleep(ACCEPT_BACKOFF_SECONDS)
            raise  # socketserver drops this attempt and serves the next one
        return request

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = len(self._deadlines) >= self.max_connections
            if not full:
                self._deadlines[request] = time.monotonic() + self.request_timeout
        if full:
            self.report_problem("full", f"status page: {self.max_connections} connections open, the most it serves "
                                "(status.web.max_connections, or a quarter of the open-file limit); answering 503")
            return self._refuse(request)
        request.settimeout(self.idle_timeout)
        try:
            super().process_request(request, client_address)
        except RuntimeError as e:  # no thread to serve it: out of memory or of the process's thread limit
            self.report_problem("thread", f"status page: cannot start a thread for a connection ({e})")
            self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        with self._lock:  # forgotten before it is closed, so service_actions never touches a closed socket
            self._deadlines.pop(request, None)
            super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # the client went away or went quiet: its own business
        self.report_problem("request", f"status page: a request failed ({type(error).__name__}: {error})")

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            try:
                sock.recv(65536)  # the request, if it came already: unread bytes at close() would send a reset
            except BlockingIOError:
                pass
            sock.send(BUSY)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._lingering.append((sock, time.monotonic() + LINGER_SECONDS))
        while len(self._lingering) > self.max_connections:
            self._lingering.pop(0)[0].close()

    def service_actions(self) -> None:
        """Called by serve_forever between accepts (every poll interval): enforce the deadlines."""
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            for sock, deadline in self._deadlines.items():
                if deadline < now:
                    try:  # wakes the handler's blocked read or write; its own thread then closes the socket
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        kept = []
        for sock, deadline in self._lingering:
            try:
                done = sock.recv(65536) == b""  # the client closed its side: nothing left to lose
            except BlockingIOError:
                done = False
            except OSError:
                done = True
            if done or deadline < now:
                sock.close()
            else:
                kept.append((sock, deadline))
        self._lingering = kept

    def server_close(self) -> None:
        super().server_close()
        for sock, _ in self._lingering:
            sock.close()
        self._lingering = []


class BoundedHTTPServer6(BoundedHTTPServer):
    address_family = socket.AF_INET6


def serve(httpd: BoundedHTTPServer, stopping: threading.Event) -> None:
    """The web thread's body: serve until stopped, and if the server loop itself fails, say so and serve on."""
    while not stopping.is_set():
        try:
            httpd.serve_forever(poll_interval=0.2)
        except Exception as e:  # noqa: BLE001 - the page must outlive any one failure
            if stopping.is_set():
                return
            httpd.report_problem("loop", f"status page: its server loop failed ({type(e).__name__}: {e}); "
                                 "serving on")
            time.sleep(1)
