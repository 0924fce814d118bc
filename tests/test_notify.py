"""sd_notify against real AF_UNIX datagram sockets, as systemd would listen for them."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

import pytest

from daemon.supervisor.notify import Notifier


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a datagram socket, in a path or in the abstract namespace."""

    def __init__(self, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"training-daemon-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
            self.dir = None
        else:
            # AF_UNIX paths are limited to 108 bytes: pytest's tmp paths can be longer.
            self.dir = tempfile.mkdtemp(prefix="td-notify-")
            path = os.path.join(self.dir, "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.sock.settimeout(2)

    def messages(self, timeout: float = 0.3) -> list[dict]:
        out = []
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def collect_in_background(self) -> list[dict]:
        """Read datagrams as systemd does, while the daemon runs; returns the list it fills."""
        import threading

        got: list[dict] = []
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                got.extend(self.messages(timeout=0.1))

        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()
        return got

    def close(self):
        if getattr(self, "_reader", None):
            self._stop.set()
            self._reader.join(2)
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def systemd(request):
    fake = FakeSystemd(abstract=request.param == "abstract")
    yield fake
    fake.close()


def test_ready_status_stopping_reach_the_socket(systemd):
    n = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    assert n.enabled
    assert n.ready()
    assert n.status("training job 3:\nstep 5/10")
    assert n.extend_timeout(180_000_000)
    assert n.stopping()
    msgs = systemd.messages()
    assert msgs[0] == {"READY": "1", "MAINPID": str(os.getpid())}
    assert msgs[1] == {"STATUS": "training job 3: step 5/10"}  # one line, as systemctl shows it
    assert msgs[2] == {"EXTEND_TIMEOUT_USEC": "180000000"}
    assert msgs[3]["STOPPING"] == "1"


def test_watchdog_only_when_asked_and_rate_limited(systemd):
    quiet = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    assert quiet.watchdog_interval() is None and not quiet.watchdog()

    n = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval() == pytest.approx(0.2)
    sent = 0
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # a busy loop calling watchdog() every turn
        sent += n.watchdog()
        time.sleep(0.01)
    assert 2 <= sent <= 4, sent
    assert [m for m in systemd.messages() if m != {"WATCHDOG": "1"}] == []


def test_watchdog_meant_for_another_pid_is_ignored(systemd):
    n = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval() is None and not n.watchdog()


def test_a_reader_that_lags_never_blocks_the_daemon(systemd):
    n = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    start = time.monotonic()
    sent = sum(n.status(f"step {i}") for i in range(5000))  # nobody reads: the socket queue fills up
    assert time.monotonic() - start < 2
    assert 0 < sent < 5000
    assert not n.stopping() and time.monotonic() - start < 4  # waits at most a second for important ones
    assert systemd.messages(timeout=0.1)[0] == {"STATUS": "step 0"}


def test_no_socket_means_no_ops_and_errors_never_raise(tmp_path):
    n = Notifier({})
    assert not n.enabled
    assert not any([n.ready(), n.status("x"), n.watchdog(), n.extend_timeout(1), n.stopping()])
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "bogus"})
    assert gone.enabled and not gone.ready() and not gone.status("x")
    assert gone.watchdog_interval() is None
    gone.close()


@pytest.mark.slow
def test_systemctl_status_line_during_training(root, tiny_model_dir):
    """Run the real daemon under a fake systemd and show what `systemctl status` would print while it trains."""
    import subprocess

    from helpers import ENTRY, chat_lines, drop, env, write_config

    if not ENTRY.exists():
        pytest.skip("training_daemon.py entry point not present yet")
    fake = FakeSystemd(abstract=True)
    try:
        write_config(root, tiny_model_dir)
        drop(root, "facts.jsonl", chat_lines(8, "fig"))
        msgs = fake.collect_in_background()
        proc = subprocess.run([sys.executable, str(ENTRY), "run", "--once", "--quiet", "--root", str(root)],
                              env=env(NOTIFY_SOCKET=fake.env_value, WATCHDOG_USEC="2000000"),
                              capture_output=True, text=True, timeout=300, cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        fake.close()
    assert msgs and msgs[0].get("READY") == "1"
    statuses = [m["STATUS"] for m in msgs if "STATUS" in m]
    training = [s for s in statuses if s.startswith("training job")]
    assert training, statuses
    assert any(m.get("WATCHDOG") == "1" for m in msgs)
    assert msgs[-1].get("STOPPING") == "1"
    shown = (f"● training-daemon.service - LoRA training daemon\n"
             f"     Active: active (running)\n"
             f"     Status: \"{training[-1]}\"")
    print("\n" + shown)
    assert "step" in training[-1] and "loss" in training[-1]


def test_show_sends_a_status_only_when_it_says_something_new(systemd):
    n = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    assert n.show("idle: watching /r/inbox") and not n.show("idle:  watching /r/inbox")
    assert n.show("job 1 (default): validating a.jsonl") and n.show("idle: watching /r/inbox")
    assert [m["STATUS"] for m in systemd.messages()] == ["idle: watching /r/inbox",
                                                         "job 1 (default): validating a.jsonl",
                                                         "idle: watching /r/inbox"]


def test_the_status_line_for_each_state_of_the_daemon():
    from daemon.supervisor.status_line import status_line

    job = {"job_id": 3, "adapter": "default", "file": "a.jsonl", "step": 5, "total_steps": 10, "loss": 1.5}
    assert status_line("training", {**job, "phase": "starting"}) == "job 3 (default): starting"
    assert status_line("training", {**job, "phase": "validating"}) == "job 3 (default): validating a.jsonl"
    assert status_line("training", {**job, "phase": "loading"}) == "job 3 (default): loading the model"
    training = status_line("training", {**job, "phase": "training"})
    assert training.startswith("training job 3 (default): [") and "step 5/10" in training and "loss 1.5000" in training
    assert status_line("training", {**job, "phase": "training", "saving_step": 6}) == \
        "job 3 (default): saving a checkpoint at step 6"
    assert status_line("training", {**job, "phase": "publishing"}) == "job 3 (default): publishing the new version"
    assert status_line("training", {**job, "phase": "stalled"}) == "job 3 (default): stalled: killing its trainer"
    assert status_line("idle", None, inbox="/r/inbox") == "idle: watching /r/inbox"
    assert status_line("paused", None, pending=2).startswith("paused by `training-daemon pause`: 2 job(s) pending")
    assert status_line("blocked", None, pending=1, reason="base model unavailable: gone").startswith(
        "blocked, no job starts: base model unavailable: gone; 1 job(s) pending")
    assert status_line("waiting_for_disk", None, reason="only 3 MiB free (floor 9 MiB)") == \
        "waiting for disk space: only 3 MiB free (floor 9 MiB); nothing pending"
