"""A hostile inbox, through the real daemon: links, special files, odd names, the same name or the same bytes
twice, a huge line, broken encodings and JSON that is not JSONL. Each file ends trained or failed with its
reason, its bytes intact; nothing in the inbox is followed, opened or overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from accounting import Inbox, account, stop, wait_event, wait_ready
from helpers import chat_lines, cli, events, jobs, start_daemon, write_config

pytestmark = pytest.mark.slow


def rejected(root) -> dict[str, str]:
    """file_rejected messages by file name."""
    return {Path(e["path"]).name: e["message"] for e in events(root, "file_rejected") if "path" in e}


def test_a_symlink_is_rejected_unread_and_cannot_be_retried(root, tiny_model_dir, tmp_path):
    write_config(root, tiny_model_dir)
    secret = tmp_path / "elsewhere.jsonl"
    secret.write_bytes(b'{"text": "not yours"}\n')
    before = secret.stat()
    inbox = Inbox(root)
    inbox.symlink("link.jsonl", secret)

    r = cli(root, "run", "--once", timeout=60)
    assert r.returncode == 1  # --once counts the rejected file as a failure
    account(root, inbox, reasons={"link.jsonl": f"symlinks are not followed: link.jsonl -> {secret}"})
    assert not events(root, "job_started")
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == (b'{"text": "not yours"}\n', before.st_mtime_ns)

    refusal = ("Error: retry: job 1 cannot be queued again: it was a symlink, which is never followed; "
               "drop the real file into the inbox")
    r = cli(root, "retry", "1")  # no daemon running: the CLI applies it itself
    assert (r.returncode, r.stderr.strip()) == (1, refusal)
    daemon = start_daemon(root)
    wait_ready(root, daemon)
    r = cli(root, "retry", "1")  # a daemon running: refused before the request is even sent
    assert (r.returncode, r.stderr.strip()) == (1, refusal)
    assert stop(daemon) == 0
    assert [j["folder"] for j in jobs(root)] == ["failed"]


def test_fifos_sockets_and_devices_are_skipped_without_being_opened(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    (root / "inbox").mkdir()
    fifo = root / "inbox" / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it to read would block until a writer came: --once would never end
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "inbox" / "sock.jsonl"))
    specials = {"pipe.jsonl": "a FIFO", "sock.jsonl": "a socket"}
    try:
        os.mknod(root / "inbox" / "dev.jsonl", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        specials["dev.jsonl"] = "a character device"
    except PermissionError:
        pass  # no CAP_MKNOD here: the FIFO and the socket still show it
    inbox.drop("good.jsonl", chat_lines(4))

    r = cli(root, "run", "--once", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
    messages = rejected(root)
    for name, what in specials.items():
        assert f"skipped: it is {what}, not a regular file (it was not opened)" in messages[name]
        assert os.path.lexists(root / "inbox" / name)  # left where it was
    with pytest.raises(OSError) as no_reader:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO
    sock.close()


def test_names_with_spaces_unicode_newlines_and_shell_syntax_work(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    names = ["spaces ünïcødé 数据.jsonl", "new\nline $(touch pwned) `touch pwned`; rm -rf x.jsonl"]
    for i, name in enumerate(names):
        inbox.drop(name, chat_lines(4, f"topic{i}"))

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    fates = account(root, inbox)
    for name in names:
        meta = json.loads((root / "checkpoints/default" / f"v{fates[name]['version']}" / "metadata.json").read_text())
        assert meta["source_file"] == name
    assert not list(root.rglob("pwned"))  # no shell ever saw a name (the trainer runs in the root)
    assert all(line[:4].isdigit() for line in (root / "status.log").read_text().splitlines())  # one line per event


def test_the_same_name_dropped_twice_never_overwrites_the_claimed_file(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    daemon = start_daemon(root, "--once")
    inbox.drop("data.jsonl", chat_lines(4, "first"))
    wait_event(root, "job_queued")
    inbox.drop("data.jsonl", chat_lines(4, "second"))  # same name, new bytes, while the first one trains

    assert daemon.wait(timeout=180) == 0
    account(root, inbox)  # two jobs, each with its own bytes
    assert len(jobs(root)) == 2


def test_the_same_content_twice_is_recognised_and_not_trained_again(root, tiny_model_dir):
    write_config(root, tiny_model_dir)  # intake.duplicate_policy: skip, the default (test_intake.py tries "train")
    inbox = Inbox(root)
    inbox.drop("monday.jsonl", chat_lines(4))
    inbox.drop("tuesday.jsonl", chat_lines(4))  # byte for byte the same

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    again = account(root, inbox)["tuesday.jsonl"]
    assert again["duplicate_of"] == 1 and again["version"] is None
    assert again["note"] == "duplicate of job 1 (same sha256); not trained again"
    assert sorted(p.name for p in (root / "checkpoints/default").glob("v*")) == ["v1"]


def test_a_huge_line_is_capped_and_reported_and_the_rest_trains(root, tiny_model_dir):
    write_config(root, tiny_model_dir, intake={"settle_seconds": 0.2, "rescan_seconds": 1, "max_line_bytes": 4096})
    huge = json.dumps({"messages": [{"role": "user", "content": "long?"},
                                    {"role": "assistant", "content": "x" * (8 << 20)}]})
    lines = chat_lines(6)
    lines.insert(2, huge)
    inbox = Inbox(root)
    inbox.drop("huge.jsonl", lines)

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    job = account(root, inbox)["huge.jsonl"]
    report = json.loads((Path(job["dir"]) / "report.json").read_text())
    (error,) = report["errors"]
    assert (error["line"], error["code"]) == (3, "line_too_long")
    assert f"line 3 is {len(huge)} bytes, more than max_line_bytes=4096" in error["message"]
    meta = json.loads((root / "checkpoints/default/v1/metadata.json").read_text())
    assert (meta["examples_trained"], meta["examples_skipped"]) == (6, 1)


GOOD = b'{"text": "fine"}\n'


@pytest.mark.parametrize("content, reason", [
    (GOOD + b'{"text": "caf\xe9"}\n', f"line 2 is not valid UTF-8: byte 0xe9 at file offset {len(GOOD) + 13}"),
    (GOOD + b'{"text": "a\x00b"}\n', f"line 2 contains a NUL byte at file offset {len(GOOD) + 11}"),
    (b'[{"text": "a"}, {"text": "b"}]\n', "JSONL means one JSON object per line"),
    (b'{\n  "text": "a"\n}\n', "this file looks like pretty-printed JSON"),
], ids=["invalid-utf8", "nul-byte", "json-array", "pretty-json"])
def test_a_file_that_is_not_utf8_jsonl_is_rejected_saying_where_and_why(root, tiny_model_dir, content, reason):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("bad.jsonl", content)

    r = cli(root, "run", "--once")
    assert r.returncode == 1
    job = account(root, inbox, reasons={"bad.jsonl": reason})["bad.jsonl"]
    assert len(job["attempts"]) == 1  # bad input is not retried
    assert "Traceback" not in job["error"]


def test_a_bom_and_crlf_line_ends_are_accepted(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("windows.jsonl", b"\xef\xbb\xbf" + "\r\n".join(chat_lines(4)).encode() + b"\r\n")

    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    account(root, inbox)
    meta = json.loads((root / "checkpoints/default/v1/metadata.json").read_text())
    assert (meta["examples_trained"], meta["examples_skipped"]) == (4, 0)
