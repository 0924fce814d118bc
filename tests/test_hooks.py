"""Hooks on published / held / failed: what a receiver gets, and that no receiver can hold up the queue.

Each receiver is a real HTTP server on 127.0.0.1 in a thread of the test; each command a real process.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import ENTRY, PROJECT, chat_lines, cli, drop, events, jobs, start_daemon, wait_for, write_config

from daemon.config_hooks import HookConfig
from daemon.paths import Layout
from daemon.supervisor import hook_delivery
from daemon.supervisor.hooks import Hooks
from daemon.supervisor.status import StatusWriter

SECRET = "the-receivers-shared-secret"

# A hook command that writes down what it was given: its stdin, its TRAINING_DAEMON_* variables, its folder.
CAPTURE = """import json, os, sys
data = {"stdin": sys.stdin.read(), "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("TRAINING_DAEMON_")}}
with open(sys.argv[1], "w") as f:
    json.dump(data, f)
"""


# A stand-in for `ollama create NAME -f Modelfile`: checks the Modelfile and its GGUF as Ollama would read them.
OLLAMA = """import json, os, pathlib, sys
assert sys.argv[1:3] == ["create", sys.argv[2]] and sys.argv[3:] == ["-f", "Modelfile"], sys.argv
source = pathlib.Path("Modelfile").read_text().splitlines()
gguf = pathlib.Path([line for line in source if line.startswith("FROM ")][0][5:])
assert gguf.read_bytes()[:4] == b"GGUF"
pathlib.Path(os.environ["OLLAMA_RECORD"]).write_text(json.dumps({"name": sys.argv[2], "gguf": str(gguf.resolve())}))
"""


class Receiver:
    """A real HTTP server: records every POST; /fail answers 500, /slow and /hang answer once released,
    /v1/load_lora_adapter checks the request as vLLM would; anything else answers 200."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, dict(self.headers), body))
                code, text = receiver.answer(self.path, self.headers, body)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up (the daemon's timeout) breaks the pipe: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, headers, body: bytes) -> tuple[int, str]:
        if path == "/fail":
            return 500, "receiver broke\n"
        if path in ("/slow", "/hang"):
            self.release.wait(120)
            return 200, "late"
        if path == "/v1/load_lora_adapter":
            req = json.loads(body)
            ok = (headers.get("Content-Type") == "application/json" and set(req) == {"lora_name", "lora_path"}
                  and (Path(req["lora_path"]) / "adapter_config.json").is_file())
            return (200, f"Success: LoRA adapter '{req['lora_name']}' added successfully.") if ok else (400, "bad")
        return 200, "ok"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def got(self, path: str) -> list[tuple[dict, bytes]]:
        return [(h, b) for p, h, b in self.requests if p == path]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def hook_events(root: Path, hook: int) -> list[dict]:
    return [e for e in events(root, "hook") if e.get("hook") == hook and e.get("outcome") != "ready"]


def capture_command(root: Path, out: str) -> list[str]:
    """A command hook written as a user would: a script path relative to the config file's folder."""
    script = root / "config" / "hooks" / "capture.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(CAPTURE)
    return [sys.executable, "hooks/capture.py", out]


def test_a_published_version_is_posted_signed_given_to_commands_and_loaded_into_vllm(root, tiny_model_dir, receiver):
    write_config(root, tiny_model_dir, hooks=[
        {"on": ["published"], "url": receiver.url("/hook"), "secret_env": "HOOK_SECRET"},
        {"on": ["published"], "command": capture_command(root, "captured.json")},
        {"on": ["published"], "command": [sys.executable, str(PROJECT / "examples/hooks/vllm_load_adapter.py")]},
        {"on": ["failed", "held"], "url": receiver.url("/not-this-time")},
        {"on": ["published"], "command": [str(PROJECT / "examples/hooks/ollama_update.sh")], "timeout_seconds": 300},
    ])
    (root / "ollama.py").write_text(OLLAMA)
    drop(root, "data.jsonl", chat_lines(6), adapter="support-bot")
    # run --once waits for its hooks to end (a stop by signal would give them 5 s).
    r = cli(root, "run", "--once", HOOK_SECRET=SECRET, VLLM_URL=receiver.url(""),
            TRAINING_DAEMON=f"{sys.executable} {ENTRY}", OLLAMA=f"{sys.executable} {root / 'ollama.py'}",
            OLLAMA_RECORD=str(root / "ollama.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    version_dir = root / "checkpoints" / "support-bot" / "v1"

    # The POST: one, JSON, signed over its exact bytes the way the docs tell a receiver to check it.
    [(headers, body)] = receiver.got("/hook")
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Training-Daemon-Event"] == "published"
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Training-Daemon-Signature"], expected)
    event = json.loads(body)
    assert event["event"] == "published" and event["adapter"] == "support-bot" and event["version"] == 1
    assert event["job_id"] == 1 and Path(event["path"]).resolve() == version_dir.resolve()
    assert event["at"] and event["message"] and event["daemon"]["root"] == str(root) and event["daemon"]["host"]

    # The command: the same event on stdin and in its environment, run in the config file's folder.
    captured = json.loads((root / "config" / "captured.json").read_text())
    assert json.loads(captured["stdin"]) == event
    env = captured["env"]
    assert env["TRAINING_DAEMON_EVENT"] == "published" and env["TRAINING_DAEMON_ADAPTER"] == "support-bot"
    assert env["TRAINING_DAEMON_VERSION"] == "1" and env["TRAINING_DAEMON_JOB_ID"] == "1"
    assert Path(env["TRAINING_DAEMON_PATH"]).resolve() == version_dir.resolve()
    assert json.loads(env["TRAINING_DAEMON_EVENT_JSON"]) == event
    assert Path(captured["cwd"]) == root / "config"

    # The vLLM example asked the (stand-in) server to load this version under a name of its own.
    [(_, load)] = receiver.got("/v1/load_lora_adapter")
    assert json.loads(load) == {"lora_name": "support-bot-v1", "lora_path": event["path"]}

    # The Ollama example exported the version to GGUF and created the model from its Modelfile.
    ollama = json.loads((root / "ollama.json").read_text())
    assert ollama["name"] == "support-bot"
    assert Path(ollama["gguf"]).parent == root / "exports" / "support-bot-v1"

    for hook in (1, 2, 3, 5):
        [outcome] = hook_events(root, hook)
        assert outcome["outcome"] == "delivered" and outcome["level"] == "info", outcome
    assert hook_events(root, 4) == [] and receiver.got("/not-this-time") == []
    log = (root / "status.log").read_text()
    assert "hook 1 (POST http://127.0.0.1:" in log and "published v1 of support-bot (job 1): delivered" in log


def test_a_failed_job_runs_the_failed_hooks_and_a_broken_receiver_is_retried_then_reported(root, tiny_model_dir,
                                                                                           receiver):
    write_config(root, tiny_model_dir, hooks=[
        {"on": ["failed"], "url": receiver.url("/fail"), "retries": 1, "timeout_seconds": 5},
        {"on": ["failed"], "command": [sys.executable, "-c", "import sys; print('reloading'); "
                                       "sys.stderr.write('reload failed: no server\\n'); sys.exit(3)"], "retries": 0},
        {"on": ["failed"], "command": capture_command(root, "failed.json")},
        {"on": ["published"], "url": receiver.url("/hook")},
        {"on": ["failed"], "url": receiver.url("/signed"), "secret_env": "UNSET_HOOK_SECRET"},
    ])
    drop(root, "broken.jsonl", ["this is not json", '{"messages": []}'])
    r = cli(root, "run", "--once")
    assert r.returncode == 1, r.stdout + r.stderr  # the job failed; the daemon itself ran
    [job] = jobs(root)
    assert job["folder"] == "failed"

    # The broken receiver: tried twice with the same delivery id, a warning then an error, each in the logs.
    tries = receiver.got("/fail")
    assert len(tries) == 2 and tries[0][0]["X-Training-Daemon-Delivery"] == tries[1][0]["X-Training-Daemon-Delivery"]
    assert json.loads(tries[0][1])["event"] == "failed"
    first, last = hook_events(root, 1)
    assert (first["outcome"], first["level"], first["http_status"]) == ("retrying", "warning", 500)
    assert (last["outcome"], last["level"], last["attempt"]) == ("failed", "error", 2)
    assert "HTTP 500" in last["error"] and "receiver broke" in last["error"]
    log = (root / "status.log").read_text()
    assert "failed job 1 (default): attempt 1 of 2 failed: HTTP 500" in log
    assert "failed job 1 (default): not delivered: 2 attempt(s) failed" in log

    # The failing command: its exit status and the end of its output.
    [failed_command] = hook_events(root, 2)
    assert failed_command["outcome"] == "failed" and failed_command["exit_code"] == 3
    assert "exit status 3" in failed_command["error"] and "reload failed: no server" in failed_command["error"]

    # What a `failed` hook is told: the job, its adapter (job_failed does not say it: found from the job) and why.
    event = json.loads(json.loads((root / "config" / "failed.json").read_text())["stdin"])
    assert event["event"] == "failed" and event["job_id"] == 1 and event["adapter"] == "default"
    assert event["error"] and event["daemon_event"] == "job_failed"
    assert receiver.got("/hook") == []

    # A hook whose secret is missing is refused at start, and each event it does not send is said.
    refused, not_sent = hook_events(root, 5)
    assert refused["outcome"] == "refused" and refused["level"] == "error" and "UNSET_HOOK_SECRET" in refused["error"]
    assert not_sent["outcome"] == "not_sent" and receiver.got("/signed") == []


def test_a_file_refused_at_intake_is_a_failed_job_for_hooks(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir, hooks=[{"on": ["failed"], "command": capture_command(root, "refused.json")}])
    target = tmp_path / "elsewhere.jsonl"
    target.write_text(chat_lines(1)[0] + "\n")
    (root / "inbox").mkdir()
    (root / "inbox" / "link.jsonl").symlink_to(target)
    r = cli(root, "run", "--once", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    event = json.loads(json.loads((root / "config" / "refused.json").read_text())["stdin"])
    assert (event["event"], event["daemon_event"], event["job_id"], event["adapter"]) == \
        ("failed", "file_rejected", 1, "default")
    assert "symlinks are not followed" in event["error"]


def test_a_slow_or_hung_receiver_never_holds_up_training(root, tiny_model_dir, receiver):
    write_config(root, tiny_model_dir, hooks=[
        {"on": ["published"], "url": receiver.url("/slow"), "timeout_seconds": 2, "retries": 0},
        {"on": ["published"], "url": receiver.url("/hang"), "timeout_seconds": 600, "retries": 0},
    ])
    drop(root, "first.jsonl", chat_lines(6, "apple"))
    drop(root, "second.jsonl", chat_lines(6, "pear"))
    daemon = start_daemon(root)
    try:
        wait_for(lambda: [j["folder"] for j in jobs(root)] == ["done", "done"], timeout=300, what="both jobs done")
        # Both trained while the /hang receiver still holds the first version's POST: nothing waited on it.
        assert len(receiver.got("/hang")) == 1 and hook_events(root, 2) == []
        slow = wait_for(lambda: [e for e in hook_events(root, 1) if e["outcome"] == "failed"] or None, timeout=30,
                        what="the slow receiver's timeout logged")
        assert slow[0]["job_id"] == 1 and slow[0]["error"] == "no answer within 2s" and slow[0]["level"] == "error"
        stopping = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert time.monotonic() - stopping < 20  # the stop waits 5 s for hooks, not for the receiver
    [abandoned] = [e for e in events(root, "hook") if e.get("outcome") == "abandoned"]
    assert abandoned["abandoned"] == 2 and abandoned["level"] == "warning"  # version 1 in flight, version 2 queued
    order = [e.get("outcome") or e["event"] for e in events(root)]
    assert order.index("abandoned") < order.index("daemon_stopped")


def test_a_hanging_command_is_killed_with_its_children_and_a_full_queue_drops_the_oldest(root, receiver,
                                                                                          monkeypatch):
    layout = Layout.at(root).ensure()
    status = StatusWriter(layout, echo=False)
    pid_file = root / "grandchild.pid"
    hanging = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
               f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    monkeypatch.setattr(hook_delivery, "MAX_PENDING", 2)
    hooks = Hooks([HookConfig(on=["held"], command=[sys.executable, "-c", hanging], timeout_seconds=1, retries=0),
                   HookConfig(on=["held"], url=receiver.url("/hang"), retries=0)], layout, status).start()
    for version in (1, 2, 3, 4):
        status.event("held", f"held v{version}", job_id=version, adapter="bot", version=version,
                     path=str(layout.checkpoints / "bot" / f"v{version}"), reason="not better than latest")
        status.event("hook", "a hook's own event", job_id=version)  # never hooked: it would loop
        time.sleep(0.2)  # the /hang receiver holds the first one in flight before the rest arrive
    killed = wait_for(lambda: [e for e in hook_events(root, 1) if e.get("job_id") == 1 and e["outcome"] == "failed"],
                      timeout=30, what="the hanging command's timeout")
    assert "no exit within 1s: killed" in killed[0]["error"]
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text()
             .split()[2], timeout=10, what="the command's own child killed with it")
    [dropped] = [e for e in hook_events(root, 2) if e["outcome"] == "dropped"]
    assert dropped["job_id"] == 2 and dropped["level"] == "warning"  # the oldest waiting one made room
    hooks.close(grace=0.5)
    assert len(receiver.got("/hang")) == 1 and receiver.got("/hang")[0][0]["X-Training-Daemon-Event"] == "held"
    abandoned = [e for e in events(root, "hook") if e.get("outcome") == "abandoned"]
    assert abandoned and abandoned[-1]["abandoned"] >= 3  # /hang: 1 in flight, 2 waiting; commands may be mid-kill


def test_a_file_name_that_is_not_utf8_is_delivered_and_commands_get_no_signing_secret(root, receiver, monkeypatch):
    layout = Layout.at(root).ensure()
    status = StatusWriter(layout, echo=False)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.setenv("SOME_OTHER_SETTING", "kept")
    out = root / "given.json"
    dump = ("import json, os, sys; "
            "json.dump({'stdin': sys.stdin.read(), 'env': dict(os.environ)}, open(sys.argv[1], 'w'))")
    hooks = Hooks([HookConfig(on=["failed"], command=[sys.executable, "-c", dump, str(out)], retries=0),
                   HookConfig(on=["failed"], url=receiver.url("/hook"), secret_env="HOOK_SECRET", retries=0)],
                  layout, status).start()
    name = "caf\udcff.jsonl"  # the byte 0xff in a file name, as Python reads it from a non-UTF-8 name
    status.event("file_rejected", f"refused {name}", level="error", job_id=7, adapter="bot", file=name,
                 path=str(root / "inbox" / name), error=f"{name}: not a regular file")
    hooks.close(grace=30)
    [(headers, body)] = receiver.got("/hook")
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Training-Daemon-Signature"], expected)
    event = json.loads(body)
    assert (event["event"], event["file"], event["job_id"]) == ("failed", name, 7)
    given = json.loads(out.read_text())
    assert json.loads(given["stdin"]) == event and json.loads(given["env"]["TRAINING_DAEMON_EVENT_JSON"]) == event
    assert given["env"]["TRAINING_DAEMON_PATH"] == str(root / "inbox" / name)
    assert "HOOK_SECRET" not in given["env"] and given["env"]["SOME_OTHER_SETTING"] == "kept"
    for hook in (1, 2):
        assert [e["outcome"] for e in hook_events(root, hook)] == ["delivered"]
    assert not events(root, "listener_error")


def test_a_timed_out_command_leaves_no_pipe_open_while_its_grandchild_lives(root, monkeypatch):
    import subprocess
    from types import SimpleNamespace

    pid_file = root / "grandchild.pid"
    holder = ("import subprocess, time; p = subprocess.Popen(['sleep', '30'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(30)")
    hooks = SimpleNamespace(cwd=root, layout=SimpleNamespace(root=root), config_path=None, targets=[], refused=[])
    target = hook_delivery.CommandTarget(1, HookConfig(on=["held"], command=[sys.executable], timeout_seconds=1),
                                         hooks, [sys.executable, "-c", holder])
    started, popen = [], subprocess.Popen

    def recording(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(hook_delivery.subprocess, "Popen", recording)
    try:
        ok, detail, _ = target.attempt(hook_delivery.Delivery("held", {"event": "held"}))
        assert not ok and detail.startswith("no exit within 1s: killed")
        [proc] = started
        # The grandchild (another session, not killed) still holds the pipe's other end: ours is closed anyway,
        # and the command itself was waited for (no zombie).
        assert proc.stdout.closed and proc.stdin.closed and proc.returncode == -signal.SIGKILL
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except OSError:
                pass


def test_hooks_written_as_the_shipped_config_shows_them_load(root, tiny_model_dir):
    """`on:` unquoted, as people write it: YAML 1.1 reads that key as true, the config must still take it."""
    path = root / "config" / "daemon.yaml"
    path.parent.mkdir()
    path.write_text(f"base_model: {tiny_model_dir}\nhooks:\n"
                    "  - on: [published, held, published]\n    url: http://127.0.0.1:9000/hook\n"
                    "    secret_env: HOOK_SECRET\n  - on: [failed]\n    command: [/usr/local/bin/page-someone]\n")
    r = cli(root, "config", "check")
    assert r.returncode == 0, r.stderr
    effective = yaml.safe_load(r.stdout)
    assert [h["on"] for h in effective["hooks"]] == [["published", "held"], ["failed"]]
    path.write_text(path.read_text().replace("http://127.0.0.1:9000/hook", "http://"))
    r = cli(root, "config", "check")
    assert r.returncode == 2 and "hooks[0].url: must be an http:// or https:// URL with a host" in r.stderr
