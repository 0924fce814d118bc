"""Hooks: a command and/or an HTTP POST of the event as JSON when a version is published or held, or a job fails.

The loop never waits on a receiver: StatusWriter hands every event to Hooks.on_event, which only queues it.
Each delivery target (one hook's command, one hook's url) has its own bounded queue and worker thread, so a slow
or dead receiver delays nothing but its own later deliveries, which stay in order. Every attempt and outcome is
a "hook" event (which hooks never see). Deliveries live in memory: a daemon killed outright loses those not made
yet, and a resumed job announces again a version its earlier attempt published, so a receiver must accept the
same version twice. The hooks are read once, at start: editing them needs a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from daemon import __version__
from daemon.config_hooks import HookConfig
from daemon.paths import Layout
from daemon.supervisor.hook_delivery import MAX_PENDING, CommandTarget, Delivery, HttpTarget, Target, shown_url, what
from daemon.supervisor.job import JobStatus, dir_name

# The daemon's event kinds that hooks hear, by the name `on:` gives them. A job that fails at intake (a symlink)
# or whose manifest is unreadable is a failed job too.
HOOKED = {"published": "published", "held": "held", "job_failed": "failed", "file_rejected": "failed",
          "job_unreadable": "failed"}
STOP_GRACE_S = 5.0


def hook_name(kind: str, record: dict) -> str | None:
    name = HOOKED.get(kind)
    if name == "failed" and kind != "job_failed" and record.get("job_id") is None:
        return None  # a file refused before it became a job: nothing was trained, nothing failed
    return name


def payload(name: str, record: dict, layout: Layout) -> dict:
    """The JSON a hook gets: the event's own fields, and the few every receiver needs, always present."""
    fields = {k: v for k, v in record.items() if k not in ("ts", "event", "level", "message")}
    out = {"event": name, "message": record.get("message"), "at": record.get("ts"), "job_id": None,
           "adapter": None, "version": None, "path": None, **fields, "daemon_event": record.get("event"),
           "daemon": {"root": str(layout.root), "host": socket.gethostname(), "pid": os.getpid(),
                      "version": __version__}}
    if out["adapter"] is None:
        out["adapter"] = _adapter_of(out, layout)
    return out


def _adapter_of(p: dict, layout: Layout) -> str | None:
    """The adapter an event is about when it does not say: from its version's path, else from its job's folder."""
    if p.get("path"):
        return Path(str(p["path"])).parent.name  # checkpoints/<adapter>/v<N>
    if isinstance(p.get("job_id"), int):
        for state in (JobStatus.FAILED, JobStatus.DONE, JobStatus.PENDING, JobStatus.RUNNING):
            try:
                return json.loads((layout.state_dir(state) / dir_name(p["job_id"]) / "job.json").read_text())["adapter"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


class Hooks:
    """The daemon's hooks: built at start from the config, a listener on its StatusWriter, closed at stop."""

    def __init__(self, hooks: list[HookConfig], layout: Layout, status, config_path: Path | None = None,
                 environ: dict | None = None):
        """Commands run in the config file's folder: their relative paths are relative to that file, like every
        path in the config. A hook that cannot work (its secret unset, its command missing) is refused here."""
        self.layout, self.status, self.config_path = layout, status, config_path
        self.cwd = Path(config_path).parent if config_path is not None else layout.root
        self.closing = threading.Event()  # the daemon stops: no new deliveries; a worker ends once its queue is empty
        self.halt = threading.Event()  # the grace is over: whatever is left is abandoned
        self.targets: list[Target] = []
        self.refused: list[tuple[int, HookConfig, str]] = []  # (index, hook, why): their events are not sent
        environ = os.environ if environ is None else environ
        for index, hook in enumerate(hooks, start=1):
            self._build(index, hook, environ)

    def _build(self, index: int, hook: HookConfig, environ) -> None:
        on = ", ".join(hook.on)
        if hook.command:
            argv, problem = self._resolve(hook.command)
            if problem:
                self._refuse(index, hook, f"command {hook.command[0]!r}: {problem}")
            else:
                self.targets.append(CommandTarget(index, hook, self, argv))
        if hook.url:
            secret = (environ.get(hook.secret_env) or None) if hook.secret_env else None
            if hook.secret_env and secret is None:
                self._refuse(index, hook, f"POST {shown_url(hook.url)}: ${hook.secret_env} (its signing secret) "
                             "is not set in the daemon's environment")
            else:
                self.targets.append(HttpTarget(index, hook, self, secret.encode() if secret else None))
        for t in self.targets:
            if t.index == index:
                self.status.event("hook", f"{t.label}: on {on}, timeout {hook.timeout_seconds:g}s, "
                                  f"{hook.retries} retries", level="info", hook=index, target=t.kind,
                                  outcome="ready", on=hook.on)

    def _resolve(self, command: list[str]) -> tuple[list[str], str | None]:
        """argv with argv[0] found now (relative to the config's folder, or on PATH), or why it cannot run."""
        exe = command[0]
        if "/" in exe:
            path = (self.cwd / Path(exe).expanduser()).resolve()
            if not path.is_file():
                return command, f"no such file ({path})"
            if not os.access(path, os.X_OK):
                return command, f"{path} is not executable (chmod +x, or name its interpreter first)"
            return [str(path), *command[1:]], None
        found = shutil.which(exe)
        return ([found, *command[1:]], None) if found else (command, "not found on the daemon's PATH")

    def _refuse(self, index: int, hook: HookConfig, why: str) -> None:
        self.refused.append((index, hook, why))
        self.status.event("hook", f"hook {index} refused: {why}; the daemon runs on without it and logs each event "
                          "it does not send", level="error", hook=index, outcome="refused", error=why)

    def start(self) -> "Hooks":
        for t in self.targets:
            t.thread.start()
        if self.targets or self.refused:
            self.status.add_listener(self.on_event)
        return self

    def on_event(self, kind: str, record: dict) -> None:
        """The listener: only queues (the loop's thread calls it). Hook events never reach it as a hooked kind."""
        if kind == "hook" or self.closing.is_set():
            return
        name = hook_name(kind, record)
        if name is None:
            return
        data = None
        for t in self.targets:
            if name in t.hook.on:
                data = data or payload(name, record, self.layout)
                dropped = t.put(Delivery(name, data))
                if dropped is not None:
                    t.log(dropped, f"dropped: {MAX_PENDING} deliveries were waiting for this target", "warning",
                          outcome="dropped")
        for index, hook, why in self.refused:
            if name in hook.on:
                data = data or payload(name, record, self.layout)
                self.status.event("hook", f"hook {index}: {what(data)}: not sent, the hook was refused at start: "
                                  f"{why}", level="warning", hook=index, outcome="not_sent", on=name,
                                  job_id=data.get("job_id"), adapter=data.get("adapter"), version=data.get("version"))

    def close(self, grace: float = STOP_GRACE_S, wait_while=None) -> None:
        """At stop: no new deliveries; those queued and in flight (retries included) get `grace` seconds, and
        while `wait_while()` is true, as long as they need (`run --once`: its hooks are part of the work asked for;
        a signal ends that). Then what is left is abandoned and logged, a running command killed with its group."""
        self.status.remove_listener(self.on_event)
        self.closing.set()
        for t in self.targets:
            with t.cond:
                t.cond.notify()
        busy = sum(len(t.queue) + (t.current is not None) for t in self.targets)
        if busy:
            until = "until they end (a signal stops waiting)" if wait_while and wait_while() else f"up to {grace:g}s"
            self.status.event("hook", f"hooks: waiting for {busy} delivery(ies) before stopping, {until}",
                              outcome="waiting", pending=busy)
        deadline = None
        while any(t.thread.is_alive() for t in self.targets):
            if deadline is None and not (wait_while and wait_while()):
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.halt.set()
        left = {}
        for t in self.targets:
            if t.thread.is_alive() or t.queue:
                n = t.abandon()
                if isinstance(t, CommandTarget):
                    t.kill()
                if n:
                    left[t.label] = n
        if left:
            listing = "; ".join(f"{label}: {n}" for label, n in left.items())
            self.status.event("hook", f"hooks: the daemon is stopping; {sum(left.values())} delivery(ies) abandoned "
                              f"after {grace:g}s ({listing})", level="warning", outcome="abandoned",
                              abandoned=sum(left.values()))


def start_hooks(cfg, layout: Layout, status) -> Hooks:
    """The config's hooks, running and listening to `status`."""
    return Hooks(cfg.hooks, layout, status, config_path=getattr(cfg, "source_path", None)).start()
