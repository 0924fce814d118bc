"""What a person sees in a terminal: `status`, `jobs`, `logs -f` and `submit --follow`.

Everything here reads the files the daemon writes (status.json, job.json, status.log); nothing talks to
the daemon, so these work the same whether it is running, stopped or on its way up. Every line they print
goes through daemon.textsafe: a file name, an adapter name or an error text cannot act on the terminal.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from daemon.durable import read_json
from daemon.paths import Layout
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import Spool
from daemon.supervisor.status import running_jobs
from daemon.textsafe import for_terminal
from daemon.version_states import annotate_jobs
from daemon.timefmt import fmt_duration, fmt_eta

STALE_SECONDS = 30  # status.json is rewritten every second while the daemon lives


# ------------------------------------------------------------------ formatting
def _unix(when) -> float | None:
    if when is None:
        return None
    if isinstance(when, (int, float)):
        return float(when)
    try:
        dt = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def fmt_age(when, now: float | None = None) -> str:
    t = _unix(when)
    return "?" if t is None else fmt_duration((now or time.time()) - t) + " ago"


def progress_bar(step, total, width: int = 30) -> str:
    if not total:
        return "[" + "?" * width + "]"
    frac = min(1.0, max(0.0, (step or 0) / total))
    filled = int(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:3.0f}%"


def _num(value, fmt: str, unit: str = "") -> str:
    return "?" if value is None else format(value, fmt) + unit


def _first_line(text, limit: int = 70) -> str:
    line = (str(text).strip().splitlines() or [""])[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ------------------------------------------------------------------ status and jobs
def daemon_line(status: dict, now: float | None = None) -> str:
    now = now or time.time()
    d = status.get("daemon") or {}
    updated = status.get("updated_unix")
    if updated is None and not d.get("state"):
        return "starting (no status.json yet)" if d.get("running") else "not running (no status.json yet)"
    age = None if updated is None else now - updated
    if d.get("running") is False:
        return f"not running (last state {d.get('state', '?')}, {fmt_duration(age)} ago)"
    text = d.get("state", "?")
    extras = [f"pid {d['pid']}"] if d.get("pid") else []
    if d.get("version"):
        extras.append(f"version {d['version']}")
    if d.get("started_at"):
        extras.append(f"up {fmt_duration(now - (_unix(d['started_at']) or now))}")
    if extras:
        text += f" ({', '.join(extras)})"
    if age is not None and age > STALE_SECONDS:
        text += f" - status not updated for {fmt_duration(age)}: is the daemon stuck or gone?"
    return text


def progress_line(cur: dict) -> str:
    """One line for a running job, the same in `status`, `submit --follow` and the journal's STATUS=."""
    parts = [progress_bar(cur.get("step"), cur.get("total_steps"), 24),
             f"step {cur.get('step') or 0}/{cur.get('total_steps') or '?'}"]
    if cur.get("loss") is not None:
        parts.append(f"loss {cur['loss']:.4f}")
    if cur.get("reward_accuracy") is not None:  # a preference (DPO) job
        parts.append(f"reward acc {cur['reward_accuracy']:.2f}")
    if cur.get("eval_loss") is not None:
        parts.append(f"eval {cur['eval_loss']:.4f}")
    if cur.get("tokens_per_s"):
        parts.append(f"{cur['tokens_per_s']:,.0f} tok/s")
    parts.append(f"ETA {fmt_eta(cur.get('eta_s'))}")
    return "  ".join(parts)


def render_status(status: dict, jobs: list[dict], now: float | None = None) -> str:
    now = now or time.time()
    d = status.get("daemon") or {}
    rows = [("daemon", daemon_line(status, now))]
    if d.get("blocked") and d.get("running") is not False:  # no job starts until this is fixed
        rows.append(("blocked", f"{d['blocked'].get('reason')} (blocked {fmt_age(d['blocked'].get('since'), now)}; "
                                "re-checked until fixed, or `training-daemon resume`)"))
    if d.get("root"):
        rows.append(("root", d["root"]))
    running = running_jobs(status)
    at_most = (d.get("parallel") or {}).get("max")
    at_most = at_most if isinstance(at_most, int) else None
    if len(running) > 1 or (at_most or 1) > 1:  # one job at a time: the rows as they always were
        limit = f" (at most {at_most} at a time)" if at_most else ""
        rows.append(("running", f"{len(running)} job{'' if len(running) == 1 else 's'}{limit}"))
    for cur in running:
        rows += _job_rows(cur, now)
    if not running:
        rows.append(("job", "none" + (" (paused)" if d.get("state") == "paused" else "")))
    q = status.get("queue")
    if q is None:  # no snapshot yet: count the folders
        q = {s.value: sum(1 for j in jobs if j.get("state") == s) for s in JobStatus}
    rows.append(("queue", "  ".join(f"{q.get(s.value, 0)} {s}" for s in JobStatus)))
    for name, a in sorted((status.get("adapters") or {}).items()):
        rows.append(("adapter", adapter_line(name, a)))
    g = status.get("gpu")
    if g:
        mem = f"{_num(g.get('mem_used_gib'), '.1f')} / {_num(g.get('mem_total_gib'), '.1f')} GiB"
        util = f", {g['util_percent']:.0f}% busy" if g.get("util_percent") is not None else ""
        rows.append(("gpu", f"{g.get('name', '?')}: {mem}{util}"))
    else:
        rows.append(("gpu", "none visible (NVML unavailable)"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {for_terminal(v)}" for k, v in rows]
    recent = sorted(jobs, key=lambda j: j.get("id") or 0)[-5:]
    if recent:
        out += ["", "recent jobs:", *("  " + line for line in render_jobs(recent, now).splitlines())]
    return "\n".join(out)


def placement(job: dict) -> str:
    """Where a running job trains: "GPU 0,1", "Slurm job 45", "slot cpu1"; "" when status.json does not say
    (a daemon of the previous version)."""
    if job.get("executor") == "slurm":
        return f"Slurm job {job.get('slurm_job_id') or '?'}"
    if job.get("devices"):
        return "GPU " + ",".join(str(dev) for dev in job["devices"])
    return f"slot {job['slot']}" if job.get("slot") else ""


def _job_rows(cur: dict, now: float) -> list[tuple[str, str]]:
    """The block `status` shows for one running job."""
    started = f", started {fmt_age(cur['started_at'], now)}" if cur.get("started_at") else ""
    where = f"  on {placement(cur)}" if placement(cur) else ""
    rows = [("job", f"#{cur.get('job_id')}  {cur.get('file', '?')} -> adapter {cur.get('adapter', '?')}"
                    f"  ({cur.get('phase') or 'training'}{started}){where}"),
            ("progress", f"{progress_bar(cur.get('step'), cur.get('total_steps'))}  step {cur.get('step') or 0}"
                         f"/{cur.get('total_steps') or '?'}"
                         + (f"  epoch {_epoch(cur['epoch'])}" if cur.get("epoch") is not None else ""))]
    loss = f"{_num(cur.get('loss'), '.4f')}"
    if cur.get("eval_loss") is not None:
        loss += f"  (eval {cur['eval_loss']:.4f})"
    if cur.get("lr") is not None:
        loss += f"  lr {cur['lr']:.2e}"
    rows.append(("loss", loss))
    rows.append(("speed", f"{_num(cur.get('tokens_per_s'), ',.0f', ' tok/s')}  ETA {fmt_eta(cur.get('eta_s'))}"
                          f"  GPU memory {_num(cur.get('gpu_mem_gib'), '.2f', ' GiB')}"
                          + (f" (card peak {cur['gpu_peak_card_gib']:.2f} GiB)"
                             if isinstance(cur.get("gpu_peak_card_gib"), (int, float)) else "")))
    return rows


def _job_when(job: dict, now: float) -> str:
    for key in ("finished_at", "started_at", "queued_at", "submitted_at"):
        if job.get(key):
            return fmt_age(job[key], now)
    return ""


def render_jobs(jobs: list[dict], now: float | None = None) -> str:
    if not jobs:
        return "no jobs"
    now = now or time.time()
    header = ("ID", "STATE", "ADAPTER", "VERSION", "FILE", "WHEN", "NOTE")
    rows = []
    for j in sorted(jobs, key=lambda j: j.get("id") or 0):
        if j.get("state") == "failed":
            note = _first_line(j.get("error"))
        elif j.get("duplicate_of") is not None:
            note = f"same bytes as job {j['duplicate_of']}"
        else:
            note = _first_line(j.get("note") or j.get("error"))
        cells = (str(j.get("id", "?")), str(j.get("state", "?")), str(j.get("adapter", "?")),
                 _version_cell(j),
                 _first_line(for_terminal(j.get("original_name", "?")), 40), _job_when(j, now), note)
        rows.append(tuple(for_terminal(c) for c in cells))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _version_cell(job: dict) -> str:
    label = (job.get("promotion") or {}).get("label")  # version_states.annotate_jobs: "v5 (held: latest stays v4)"
    if label:
        return str(label)
    return f"v{job['version']}" if job.get("version") is not None else "-"


def adapter_line(name: str, a: dict) -> str:
    """One adapter's `latest`, newest and held versions: "default: latest v4, newest v5, held v5"."""
    def v(n):
        return f"v{n}" if n is not None else "none"

    text = f"{name}: latest {v(a.get('latest'))}"
    if a.get("newest") != a.get("latest"):
        text += f", newest {v(a.get('newest'))}"
    if a.get("held"):
        text += f", held {', '.join(v(n) for n in a['held'])}"
    return text


# ------------------------------------------------------------------ following
def _tail(f, n: int, block: int = 65536) -> list[bytes]:
    """The last n lines of an open binary file, reading backwards (status.log can be 50 MB)."""
    end = f.seek(0, os.SEEK_END)
    data, pos = b"", end
    while pos > 0 and data.count(b"\n") <= n:
        pos = max(0, pos - block)
        f.seek(pos)
        data = f.read(end - pos)
    f.seek(end)
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first one is probably cut
    if lines and lines[-1] == b"":
        lines.pop()
    return lines[-n:] if n > 0 else []


def _shown(line: bytes) -> str:
    # The daemon escapes what it writes; a line someone else appended (or an older version wrote) is escaped here.
    return for_terminal(line.decode("utf-8", "replace"))


def last_log_lines(path, lines: int = 20) -> list[str]:
    """The last `lines` lines of status.log as `logs` shows them; none if there is no log yet."""
    try:
        with open(path, "rb") as f:
            return [_shown(line) for line in _tail(f, lines)]
    except FileNotFoundError:
        return []


def follow_log(path, lines: int = 20, poll: float = 0.25):
    """`tail -F`: the last `lines` lines, then every new one; survives rename, delete and truncation."""
    path = Path(path)
    f, ident, partial = None, None, b""

    def reopen():
        nonlocal f, ident
        if f:
            f.close()
        try:
            f = open(path, "rb")
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            f, ident = None, None

    reopen()
    if f:
        for line in _tail(f, lines):
            yield _shown(line)
    while True:
        chunk = f.read() if f else b""
        if chunk:
            partial += chunk
            *complete, partial = partial.split(b"\n")
            for line in complete:
                yield _shown(line)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (f is None or (st.st_dev, st.st_ino) != ident):
            reopen()  # rotated: the old file was read to its end just above; the new one from its start
            partial = b""
            continue
        if f is not None and st is not None and st.st_size < f.tell():
            f.seek(0)  # truncated in place (copytruncate)
            partial = b""
            continue
        time.sleep(poll)


def follow_job(layout: Layout, job_id: int, out, poll: float = 0.5, missing_timeout: float = 10.0) -> int:
    """A live progress line until the job ends: 0 if it ends done, 1 if failed (or never appears)."""
    tty = bool(getattr(out, "isatty", lambda: False)())
    spool = Spool(layout)
    shown, shown_len, last_print, missing_since, shown_kind = None, 0, 0.0, None, None

    def show(text: str, final: bool = False):
        nonlocal shown, shown_len, last_print
        safe = for_terminal(text)
        if tty:
            out.write("\r" + safe.ljust(shown_len) + ("\n" if final else ""))
            shown_len = 0 if final else len(safe)
        else:
            out.write(safe + "\n")  # a pipe or a log file: plain lines, no carriage returns
        out.flush()
        shown, last_print = text, time.monotonic()

    try:
        while True:
            found = spool.get(job_id)
            if found is None:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > missing_timeout:
                    show(f"job {job_id}: not found under {layout.queue}", final=True)
                    return 1
                time.sleep(poll)
                continue
            missing_since = None
            job, state = found[0], found[0].state
            if state == JobStatus.DONE:
                where = layout.checkpoints / job.adapter / f"v{job.version}"
                shown_version = _version_cell(annotate_jobs(layout.checkpoints, [job.to_dict()])[0])
                show(f"job {job_id} done: adapter {job.adapter} {shown_version} ({where})", final=True)
                return 0
            if state == JobStatus.FAILED:
                show(f"job {job_id} failed: {_first_line(job.error, 200) or 'see training-daemon jobs'}", final=True)
                return 1
            status = read_json(layout.status_json) or {}
            running = running_jobs(status)
            cur = next((r for r in running if r.get("job_id") == job_id), None)
            kind = state
            if state == JobStatus.RUNNING and cur is not None:
                phase = cur.get("phase") or "training"
                kind = phase
                text = f"job {job_id} " + (progress_line(cur) if phase == "training" else f"{phase}...")
            elif state == JobStatus.PENDING:
                ahead = sum(1 for other in spool.ids(JobStatus.PENDING) if other < job_id)
                text = f"job {job_id} queued" + (f", {ahead} ahead of it" if ahead else ", next")
                if len(running) == 1:
                    text += f" (job {running[0].get('job_id')} is {running[0].get('phase') or 'training'})"
                elif running:
                    text += f" (jobs {', '.join(str(r.get('job_id')) for r in running)} are running)"
                if (status.get("daemon") or {}).get("state") == "paused":
                    text += " (daemon paused)"
                if job.note:
                    text += f" - {_first_line(job.note, 80)}"
            else:
                text = f"job {job_id} starting..."
            updated = status.get("updated_unix")
            if updated is not None and time.time() - updated > STALE_SECONDS:
                text += f"  [daemon silent for {fmt_duration(time.time() - updated)}]"
            # A terminal line is redrawn in place; a pipe gets a line per change, at most one per 10 s.
            if text != shown and (tty or kind != shown_kind or time.monotonic() - last_print >= 10):
                show(text)
                shown_kind = kind
            time.sleep(poll)
    except KeyboardInterrupt:
        out.write(f"\nstopped following job {job_id}; it carries on (training-daemon status)\n")
        out.flush()
        return 130


def _epoch(epoch) -> str:
    """Progress events count epochs from 0; people count them from 1."""
    return str(epoch + 1) if isinstance(epoch, int) else f"{epoch:.2f}"
