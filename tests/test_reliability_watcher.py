"""Watcher faults: the inbox observer dies, events get lost, inotify is not there, a file cannot be taken.
In each case the file is still found (restarted observer, periodic rescan, polling) and nothing blocks.
"""

from __future__ import annotations

import os
import time

import pytest

from accounting import Inbox, account, faults, stop, wait_event, wait_ready
from helpers import chat_lines, cli, events, jobs, start_daemon, write_config

pytestmark = pytest.mark.slow
# Rescans an hour apart: a file found within seconds was found by the observer.
WATCH_ONLY = {"settle_seconds": 0.2, "rescan_seconds": 3600}


def test_a_dead_observer_is_restarted(root, tiny_model_dir):
    write_config(root, tiny_model_dir, intake=WATCH_ONLY)
    inbox = Inbox(root)
    daemon = start_daemon(root)
    wait_ready(root, daemon)

    os.rmdir(root / "inbox")  # the inotify watch goes with the folder: the observer's emitter stops
    assert "inbox watcher was not running; restarted it" in wait_event(root, "watcher_restarted", timeout=10)["message"]
    inbox.drop("data.jsonl", chat_lines(4))
    wait_event(root, "job_queued", timeout=10)
    wait_event(root, "job_done")
    assert stop(daemon) == 0
    account(root, inbox)


def test_events_lost_are_made_up_for_by_the_periodic_rescan(root, tiny_model_dir):
    write_config(root, tiny_model_dir, intake={"settle_seconds": 0.2, "rescan_seconds": 1})
    inbox = Inbox(root)
    # Every inotify event is dropped, as after a queue overflow or on a network filesystem.
    daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=faults({"point": "watch_event", "kind": "drop"}))
    wait_ready(root, daemon)
    time.sleep(1.5)  # past the first scan: the file can only be found by a later one

    inbox.drop("data.jsonl", chat_lines(4))
    wait_event(root, "job_queued", timeout=10)
    wait_event(root, "job_done")
    assert stop(daemon) == 0
    account(root, inbox)


def test_polling_mode_finds_files_without_inotify(root, tiny_model_dir):
    write_config(root, tiny_model_dir, intake={**WATCH_ONLY, "polling": True})
    inbox = Inbox(root)
    daemon = start_daemon(root)
    wait_ready(root, daemon)
    time.sleep(1.5)  # past the first scan: the file can only be found by the polling observer

    inbox.drop("data.jsonl", chat_lines(4))
    wait_event(root, "job_queued", timeout=10)
    wait_event(root, "job_done")
    assert stop(daemon) == 0
    account(root, inbox)


def test_a_file_that_cannot_be_taken_stays_in_the_inbox_and_once_still_ends(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    path = inbox.drop("stuck.jsonl", chat_lines(4))
    data = path.read_bytes()

    r = cli(root, "run", "--once", timeout=60, TRAINING_DAEMON_FAULTS=faults({"point": "claim", "kind": "error"}))
    assert r.returncode == 1
    assert path.read_bytes() == data and not jobs(root)  # given back to the inbox, untouched
    assert not list((root / "queue").glob("*/.claim-*"))
    message = events(root, "file_rejected")[0]["message"]
    assert "cannot take stuck.jsonl for adapter default: RuntimeError: injected fault at claim" in message
    assert "it stays in the inbox" in message

    r = cli(root, "run", "--once")  # whatever stopped it is gone: the file is taken and trained
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
