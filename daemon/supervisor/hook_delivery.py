"""How one hook target delivers an event: a command (argv, stdin, env, killed on timeout) or an HTTP POST
(signed, no redirects), with retries and a growing pause, each attempt and outcome a "hook" event.

hooks.py decides what is delivered to whom; this module only delivers.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from daemon import __version__
from daemon.config_hooks import HookConfig

MAX_PENDING = 1000  # per target; beyond it the oldest waiting delivery is dropped, and said so
BACKOFF_CAP_S = 30.0
MAX_ENV_JSON = 100_000  # bytes of event JSON put in $TRAINING_DAEMON_EVENT_JSON; a longer one is on stdin only
_TAIL_LINES, _TAIL_CHARS = 5, 600  # of a failed command's output, or of an error response's body


def backoff(attempt: int) -> float:
    """Seconds before the next attempt after attempt number `attempt` failed: 1, 2, 4, ... up to 30."""
    return min(BACKOFF_CAP_S, 2.0 ** (attempt - 1))


def signature(secret: bytes, body: bytes) -> str:
    """X-Training-Daemon-Signature's value: GitHub's convention, an HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def shown_url(url: str) -> str:
    """A URL for the log: no user:password, no query (tokens live there: Slack, Discord)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def tail(output: bytes) -> str:
    lines = [ln.strip() for ln in output.decode("utf-8", "replace").splitlines() if ln.strip()]
    return " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]


def what(p: dict) -> str:
    """The event in a few words, for log lines: "published v3 of bot (job 7)"."""
    job = f"job {p['job_id']}" if p.get("job_id") is not None else "no job"
    if p["event"] == "failed":
        return f"failed {job}" + (f" ({p['adapter']})" if p.get("adapter") else "")
    return f"{p['event']} v{p.get('version')} of {p.get('adapter')} ({job})"


def _env_text(value: str) -> str:
    """An environment value the OS takes: a lone surrogate that is no undecodable byte becomes U+FFFD."""
    try:
        value.encode("utf-8", "surrogateescape")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class Delivery:
    """One event for one target: the body is built once, so every attempt (and its signature) sends the same bytes."""

    def __init__(self, name: str, data: dict):
        self.name, self.payload, self.id = name, data, str(uuid.uuid4())
        # ASCII (\uXXXX escapes): a file name that is not UTF-8 holds lone surrogates, which UTF-8 cannot encode
        self.body = json.dumps(data, default=str, ensure_ascii=True).encode("ascii")


class Target:
    """One hook's command or url: its queue, its worker thread, its attempts. `hooks` is the Hooks it belongs
    to: its status writer, its closing and halt flags, its layout and the folder commands run in."""

    kind = ""

    def __init__(self, index: int, hook: HookConfig, hooks):
        self.index, self.hook, self.hooks = index, hook, hooks
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.current: Delivery | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._work, name=f"hook-{index}-{self.kind}", daemon=True)

    @property
    def label(self) -> str:
        return f"hook {self.index} ({self.describe()})"

    def describe(self) -> str:
        raise NotImplementedError

    def attempt(self, d: Delivery) -> tuple[bool, str, dict]:
        """One try: (delivered, what happened in a few words, fields for the event)."""
        raise NotImplementedError

    def put(self, d: Delivery) -> Delivery | None:
        """Queue a delivery; the one dropped to make room, if any."""
        with self.cond:
            dropped = self.queue.popleft() if len(self.queue) >= MAX_PENDING else None
            self.queue.append(d)
            self.cond.notify()
        return dropped

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.hooks.closing.is_set():
                    self.cond.wait()
                if not self.queue or self.abandoned:
                    return
                self.current = self.queue.popleft()
            try:
                self._deliver(self.current)
            except Exception as e:  # a bug here must not end this target's thread with events still to come
                self.log(self.current, f"failed: {e!r}", "error", outcome="failed", error=repr(e))
            finally:
                self.current = None

    def _deliver(self, d: Delivery) -> None:
        attempts = 1 + self.hook.retries
        for n in range(1, attempts + 1):
            started = time.monotonic()
            ok, detail, fields = self.attempt(d)
            fields.update(attempt=n, attempts=attempts, seconds=round(time.monotonic() - started, 3))
            if self.abandoned:
                return  # the daemon stopped without it: counted among the abandoned
            if ok:
                self.log(d, f"delivered ({detail}, attempt {n} of {attempts})", "info", outcome="delivered", **fields)
                return
            if n == attempts:
                break
            pause = backoff(n)
            self.log(d, f"attempt {n} of {attempts} failed: {detail}; next attempt in {pause:g}s", "warning",
                     outcome="retrying", error=detail, **fields)
            if self.hooks.halt.wait(pause):
                return  # the daemon stopped without it: counted among the abandoned
        self.log(d, f"not delivered: {attempts} attempt(s) failed, the last: {detail}", "error", outcome="failed",
                 error=detail, **fields)

    def log(self, d: Delivery | None, message: str, level: str, **fields) -> None:
        p = d.payload if d else {}
        self.hooks.status.event("hook", f"{self.label}: {what(p) + ': ' if d else ''}{message}", level=level,
                                hook=self.index, target=self.kind, on=p.get("event"), job_id=p.get("job_id"),
                                adapter=p.get("adapter"), version=p.get("version"),
                                delivery=d.id if d else None, **fields)

    def abandon(self) -> int:
        """Give up at stop: the number of deliveries left undone (waiting, and the one in flight)."""
        with self.cond:
            self.abandoned = True
            left = len(self.queue) + (self.current is not None)
            self.queue.clear()
            self.cond.notify()
        return left


class CommandTarget(Target):
    """argv, no shell, in its own process group (killed whole at the timeout); the event JSON on stdin."""

    kind = "command"

    def __init__(self, index: int, hook: HookConfig, hooks, argv: list[str]):
        super().__init__(index, hook, hooks)
        self.argv = argv
        self.proc: subprocess.Popen | None = None

    def describe(self) -> str:
        text = shlex.join(self.hook.command)
        return text if len(text) <= 80 else text[:77] + "..."

    def environment(self, d: Delivery) -> dict:
        p = d.payload
        text = {k: "" if p.get(k) is None else str(p.get(k)) for k in ("adapter", "version", "path", "job_id")}
        # Linux refuses to start a program given one environment string over 128 KiB: a long error text must not
        # keep the hook from running, so past a bound the JSON is on stdin only.
        whole = d.body.decode("ascii") if len(d.body) <= MAX_ENV_JSON else ""
        # A command is not given the signing secrets of the url hooks (the variables their secret_env names).
        secrets = {h.secret_env for h in self._all_hooks() if h.secret_env}
        inherited = {k: v for k, v in os.environ.items() if k not in secrets}
        own = {"TRAINING_DAEMON_EVENT": d.name, "TRAINING_DAEMON_EVENT_JSON": whole,
               "TRAINING_DAEMON_ADAPTER": text["adapter"], "TRAINING_DAEMON_VERSION": text["version"],
               "TRAINING_DAEMON_PATH": text["path"], "TRAINING_DAEMON_JOB_ID": text["job_id"],
               "TRAINING_DAEMON_ROOT": str(self.hooks.layout.root),
               **({"TRAINING_DAEMON_CONFIG": str(self.hooks.config_path)} if self.hooks.config_path else {})}
        return {**inherited, **{k: _env_text(v) for k, v in own.items()}}

    def _all_hooks(self) -> list[HookConfig]:
        hooks = self.hooks
        return [t.hook for t in getattr(hooks, "targets", ())] + [h for _, h, _ in getattr(hooks, "refused", ())]

    def attempt(self, d: Delivery) -> tuple[bool, str, dict]:
        timeout = self.hook.timeout_seconds
        try:
            self.proc = proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=self.hooks.cwd, env=self.environment(d), start_new_session=True)
        except OSError as e:
            return False, f"cannot run {self.argv[0]}: {e.strerror or e}", {}
        try:
            out, _ = proc.communicate(d.body, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            try:  # a grandchild in another group may hold the pipe open: do not wait on it for long
                out, _ = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                out = b""
            finally:
                self._release(proc)
            last = tail(out)
            return False, f"no exit within {timeout:g}s: killed" + (f"; its output: {last}" if last else ""), {}
        finally:
            self.proc = None
        if proc.returncode == 0:
            return True, "exit status 0", {"exit_code": 0}
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit status {code}"
        last = tail(out)
        return False, how + (f": {last}" if last else ""), {"exit_code": code}

    @staticmethod
    def _release(proc: subprocess.Popen) -> None:
        """After a timeout: close the pipes (a grandchild may still hold their other ends) and reap the child."""
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            proc.wait(timeout=5)  # killed with its group: this is at once, unless it is stuck in the kernel
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect turns a POST into a GET: a 3xx is an answer, not 2xx
        return None


class HttpTarget(Target):
    """POST of the event JSON; 2xx is delivered, anything else (or no answer in time) a failed attempt."""

    kind = "url"
    _opener = urllib.request.build_opener(_NoRedirect)

    def __init__(self, index: int, hook: HookConfig, hooks, secret: bytes | None):
        super().__init__(index, hook, hooks)
        self.secret = secret

    def describe(self) -> str:
        return f"POST {shown_url(self.hook.url)}" + (" signed" if self.secret else "")

    def attempt(self, d: Delivery) -> tuple[bool, str, dict]:
        headers = {"Content-Type": "application/json", "User-Agent": f"training-daemon/{__version__}",
                   "X-Training-Daemon-Event": d.name, "X-Training-Daemon-Delivery": d.id}
        if self.secret is not None:
            headers["X-Training-Daemon-Signature"] = signature(self.secret, d.body)
        request = urllib.request.Request(self.hook.url, data=d.body, headers=headers, method="POST")
        timeout = self.hook.timeout_seconds
        try:
            with self._opener.open(request, timeout=timeout) as response:
                response.read(65536)
                return True, f"HTTP {response.status}", {"http_status": response.status}
        except urllib.error.HTTPError as e:
            try:
                body = tail(e.read(4096))
            except (OSError, ValueError):
                body = ""
            return False, f"HTTP {e.code} {e.reason}" + (f": {body}" if body else ""), {"http_status": e.code}
        except (TimeoutError, socket.timeout):
            return False, f"no answer within {timeout:g}s", {}
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                return False, f"no answer within {timeout:g}s", {}
            return False, f"cannot reach it: {getattr(reason, 'strerror', None) or reason}", {}
        except Exception as e:  # http.client's errors (a closed connection) and the like
            return False, f"{type(e).__name__}: {e}", {}
