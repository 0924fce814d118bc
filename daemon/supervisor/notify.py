"""sd_notify(3) without libsystemd: tell systemd we are ready, what we are doing, and that we are alive.

systemd passes $NOTIFY_SOCKET (a filesystem path, or "@name" for the abstract namespace) to Type=notify
services; each notification is one datagram of "KEY=VALUE" lines. Without the variable (a terminal, a test,
another supervisor) every method does nothing. Nothing here ever raises: losing a status line must never
take the daemon down, and a missed watchdog ping shows up in systemd on its own.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or ""
        # "@name" is Linux's abstract namespace: the kernel's name for it starts with a NUL byte.
        self.address: str | None = ("\0" + raw[1:]) if raw.startswith("@") else (raw or None)
        self._watchdog_usec = _watchdog_usec(env)
        self._last_ping = float("-inf")
        self._shown: str | None = None  # the last STATUS= handed to the socket
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str, wait: float = 0.0) -> bool:
        """Send "KEY=VALUE" lines as one datagram; True if it was handed to the socket.

        Never blocks for longer than `wait`: a datagram socket whose reader lags blocks its senders, and
        a status line is not worth stalling the daemon (a stuck daemon is what the watchdog is for).
        """
        if not self.address:
            return False
        deadline = time.monotonic() + wait
        data = "\n".join(assignments).encode("utf-8", "replace")
        while True:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, socket.MSG_DONTWAIT, self.address)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
            except Exception:
                return False

    def ready(self) -> bool:
        return self.send("READY=1", f"MAINPID={os.getpid()}", wait=2.0)

    def status(self, text: str) -> bool:
        # STATUS= is one line in `systemctl status`; a newline would start a new (bogus) assignment.
        line = " ".join(str(text).split())
        sent = self.send("STATUS=" + line)
        self._shown = line if sent else None
        return sent

    def show(self, text: str) -> bool:
        """STATUS= only when it says something new: the daemon calls this every turn of its loop."""
        if " ".join(str(text).split()) == self._shown:
            return False
        return self.status(text)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec (sd_watchdog_enabled's advice), or None if off."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def watchdog(self, force: bool = False) -> bool:
        """Ping the watchdog, at most once per watchdog_interval(), so calling it every loop turn is cheap."""
        interval = self.watchdog_interval()
        if interval is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_ping < interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for usec more before systemd gives up on a start or stop (a checkpoint being saved)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(usec)}", wait=1.0)

    def stopping(self) -> bool:
        self._shown = "stopping"
        return self.send("STOPPING=1", "STATUS=stopping", wait=1.0)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except Exception:
                pass
            self._sock = None


def _watchdog_usec(env) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC") or 0)
    except ValueError:
        return None
    # WATCHDOG_PID names the process systemd expects pings from; a child that inherited the
    # environment must not ping on its parent's behalf.
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    return usec if usec > 0 else None
