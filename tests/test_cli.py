"""The `training-daemon` command in-process, through click's CliRunner: what a user sees (stdout, stderr, exit
code) for each command, without starting a Python per call. The real-process runs are in the daemon tests."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import pytest
import yaml
from click.testing import CliRunner

from daemon.cli import main
from daemon.paths import Layout
from daemon.supervisor.spool import Spool
from helpers import chat_lines, drop, write_config


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(root):
    """Call the command's entry point, main(), as the shell would, with the test's root."""
    umask = os.umask(0o022)  # main() tightens the umask for the whole process: give the test's own back after
    os.umask(umask)

    def run(*args: str, with_root: bool = True) -> Result:
        argv = [*args, "--root", str(root)] if with_root else list(args)
        with CliRunner().isolation() as (out, err, _):
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            finally:  # some commands print() rather than click.echo(), which flushes
                sys.stdout.flush()
                sys.stderr.flush()
        return Result(code, out.getvalue().decode(), err.getvalue().decode())

    yield run
    os.umask(umask)


@pytest.fixture
def config(root, tmp_path):
    """A config whose base model is a folder that passes the load-time check (only config.json is read)."""
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return write_config(root, model)


def queue_a_job(root, name: str = "data.jsonl"):
    return Spool(Layout.at(root).ensure()).claim(drop(root, name, chat_lines(3)), "default", name)


def test_help_lists_every_command(run_cli):
    r = run_cli("--help", with_root=False)
    assert r.code == 0 and r.err == ""
    assert "Usage: training-daemon" in r.out
    for command in ("run", "submit", "status", "jobs", "validate", "config", "logs", "pause", "resume", "cancel",
                    "retry", "export", "install-service", "ask"):
        assert f"\n  {command} " in r.out, command


def test_an_unknown_command_is_a_usage_error(run_cli):
    r = run_cli("trian", with_root=False)
    assert r.code == 2 and r.out == ""
    assert "No such command 'trian'" in r.err and "Traceback" not in r.err


def test_config_check_prints_the_effective_config(run_cli, config):
    r = run_cli("config", "check")
    assert r.code == 0, r.err
    assert f"# effective config from {config}" in r.out
    assert yaml.safe_load(r.out)["training"]["micro_batch_size"] == 2


def test_config_check_reports_a_bad_value_in_one_line_and_exits_2(run_cli, root, config):
    data = yaml.safe_load(config.read_text())
    data["training"]["epochs"] = 0
    config.write_text(yaml.safe_dump(data))
    r = run_cli("config", "check")
    assert r.code == 2 and r.out == ""
    errors = [line for line in r.err.splitlines() if "training.epochs" in line]
    assert len(errors) == 1 and "too small" in errors[0], r.err
    assert "Traceback" not in r.err


def test_a_missing_config_file_is_named_with_what_to_do(run_cli, root):
    r = run_cli("config", "check", "--config", str(root / "nowhere.yaml"))
    assert r.code == 2 and r.out == ""
    assert r.err.startswith(f"Error: config {root / 'nowhere.yaml'} has 1 error:\n")
    assert "does not exist: pass --config FILE" in r.err and "Traceback" not in r.err


@pytest.mark.slow  # validating counts tokens with the base model's tokenizer: the session's tiny model
def test_validate_a_good_and_a_bad_file(run_cli, root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    good = drop(root, "good.jsonl", chat_lines(4))
    r = run_cli("validate", str(good))
    assert r.code == 0, r.out + r.err
    assert r.out.startswith("good.jsonl: OK: 4 usable examples (messages format)\n"), r.out

    bad = drop(root, "bad.jsonl", ["{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    r = run_cli("validate", str(bad))
    assert r.code == 1 and r.err == "", r.out + r.err
    assert r.out.startswith("bad.jsonl: REJECTED (too_few_examples): no usable example")
    assert "\n  line 1: invalid JSON" in r.out and "\n  line 2: no assistant message" in r.out


def test_validate_a_missing_file_is_a_usage_error(run_cli, config):
    r = run_cli("validate", "missing.jsonl")
    assert r.code == 2 and "does not exist" in r.err and "Traceback" not in r.err


def test_jobs_and_status_on_an_empty_root(run_cli):
    r = run_cli("jobs")
    assert (r.code, r.out, r.err) == (0, "no jobs\n", "")
    assert json.loads(run_cli("jobs", "--json").out) == []
    r = run_cli("status")
    assert r.code == 0 and r.err == ""
    assert "0 pending" in r.out and "job" in r.out
    snap = json.loads(run_cli("status", "--json").out)
    assert snap["daemon"]["running"] is False


def test_jobs_and_status_show_a_queued_job(run_cli, root):
    queue_a_job(root)
    r = run_cli("jobs")
    assert r.code == 0
    header, row = r.out.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "ADAPTER", "VERSION", "FILE"]
    assert row.split()[:5] == ["1", "pending", "default", "-", "data.jsonl"]
    [job] = json.loads(run_cli("jobs", "--json").out)
    assert (job["id"], job["state"], job["original_name"]) == (1, "pending", "data.jsonl")
    assert run_cli("jobs", "--state", "done").out == "no jobs\n"
    assert "1 pending" in run_cli("status").out


def test_retry_and_cancel_of_an_unknown_job_fail_in_one_line(run_cli):
    for action in ("retry", "cancel"):
        r = run_cli(action, "42")
        assert r.code != 0 and r.out == ""
        assert r.err == f"Error: {action}: no job 42\n"


def test_cancel_a_pending_job_without_a_daemon(run_cli, root):
    queue_a_job(root)
    r = run_cli("cancel", "1")
    assert (r.code, r.out, r.err) == (0, "job 1 cancelled\n", "")
    [job] = json.loads(run_cli("jobs", "--json").out)
    assert job["state"] == "failed" and job["error"] == "cancelled by user"
    r = run_cli("cancel", "1")
    assert r.code != 0 and r.err == "Error: cancel: job 1 is failed, not pending\n"


def test_pause_and_resume_without_a_daemon(run_cli, root):
    flag = Layout.at(root).state / "paused"  # what the daemon reads when it starts
    r = run_cli("pause")
    assert (r.code, r.out, r.err) == (0, "paused (no daemon is running; it starts paused)\n", "")
    assert flag.exists()
    r = run_cli("resume")
    assert (r.code, r.out, r.err) == (0, "resumed\n", "")
    assert not flag.exists()


def test_jobs_shows_a_job_whose_manifest_cannot_be_read_and_moves_nothing(run_cli, root):
    queue_a_job(root)
    queue_a_job(root, "other.jsonl")
    manifest = Layout.at(root).state_dir("pending") / "j000001" / "job.json"
    manifest.write_text('{"id": 1, "adapter": "def')
    r = run_cli("jobs")
    assert r.code == 0
    rows = r.out.splitlines()[1:]
    assert rows[0].split()[:5] == ["1", "pending", "?", "-", "?"] and "job.json is not valid JSON" in rows[0]
    assert rows[1].split()[:5] == ["2", "pending", "default", "-", "other.jsonl"]
    assert [j["id"] for j in json.loads(run_cli("jobs", "--json").out)] == [1, 2]
    assert "2 pending" in run_cli("status").out
    assert manifest.read_text() == '{"id": 1, "adapter": "def'  # a reader never repairs: the daemon does


def test_retry_takes_the_current_config_or_keeps_the_snapshot(run_cli, root, config):
    queue_a_job(root)
    assert run_cli("cancel", "1").code == 0
    r = run_cli("retry", "1", "--same-config")
    assert (r.code, r.out) == (0, "job 1 queued again (no config snapshot yet: it takes the config at its start)\n")
    assert run_cli("cancel", "1").code == 0
    r = run_cli("retry", "1")
    assert (r.code, r.out) == (0, "job 1 queued again with the current config (config.json: none before)\n")
    snapshot = json.loads((Layout.at(root).state_dir("pending") / "j000001" / "config.json").read_text())
    assert snapshot["training"]["max_length"] == 128  # the test config's, as the daemon would have taken it
    log = (root / "status.log").read_text()
    assert "job 1 cancelled" in log and "job 1 queued again with the current config" in log  # said by the CLI


def test_retry_help_names_same_config(run_cli):
    r = run_cli("retry", "--help", with_root=False)
    assert r.code == 0 and "--same-config" in r.out


def test_submit_needs_no_loadable_base_model_only_the_intake_limits(run_cli, root, tmp_path):
    """The daemon's config may name a base model this shell cannot see yet: the file is still submitted."""
    write_config(root, tmp_path / "not-downloaded-yet")
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(chat_lines(3)))
    r = run_cli("submit", str(src))
    assert r.code == 0, r.err
    assert "submitted" in r.out and "warning: the config could not be loaded" in r.err
    assert (root / "inbox" / "chats.jsonl").read_bytes() == src.read_bytes()
