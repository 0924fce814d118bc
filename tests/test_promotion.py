"""`latest` as a durable record: a held version is published but `latest` stays; `promote` and `rollback` move it
by hand, atomically and logged, with or without a daemon; every listing (jobs, status, status --json, the page's
API, /metrics) shows latest, newest and held versions. Versions are published through versions.publish (the
trainer's own call) with the metadata the gate writes; the last test has a real daemon's gate hold one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon import durable, promotion, versions
from daemon.paths import Layout
from daemon.protocol import Event
from daemon.supervisor import decision_log, latest_commands, trainer_events
from daemon.supervisor.job import Job, dir_name
from daemon.supervisor.outcome import Outcome, OutcomeKind
from daemon.supervisor.policy import Decision, Verdict
from daemon.supervisor.status import StatusWriter
from helpers import PROJECT, chat_lines, cli, drop, env, events, write_config

HELD_REASON = "standing eval loss 1.84 vs 1.21 for v1 (+52%)"


def publish(root: Path, decision: str = "promoted", job_id: int = 1, reason: str | None = None,
            fingerprint: str = "fp-a", adapter: str = "default", incumbent=..., **extra) -> int:
    """A version as the trainer publishes it: staged, its metadata with the gate's verdict, then versions.publish."""
    adapter_dir = root / "checkpoints" / adapter
    staged = versions.staging_dir(adapter_dir, job_id)
    (staged / "adapter_config.json").write_text('{"r": 4}')
    (staged / "adapter_model.safetensors").write_bytes(os.urandom(256))
    meta = {"adapter": adapter, "job_id": job_id, "source_file": f"file{job_id}.jsonl",
            "base_model_fingerprint": fingerprint, "finished_at": "2026-11-30T09:00:00+00:00",
            "promotion": {"policy": "not_worse", "tolerance": 0.02, "decision": decision,
                          "reason": reason or ("no latest version yet" if decision == "promoted" else HELD_REASON),
                          "incumbent_version": versions.promoted_version(adapter_dir) if incumbent is ...
                          else incumbent}, **extra}
    version, _ = versions.publish(adapter_dir, staged, meta, promote=decision == "promoted")
    return version


def done_job(root: Path, job_id: int, version: int, adapter: str = "default") -> None:
    d = root / "queue" / "done" / dir_name(job_id)
    d.mkdir(parents=True)
    durable.write_json(d / "job.json", {"id": job_id, "adapter": adapter, "original_name": f"file{job_id}.jsonl",
                                        "state": "done", "version": version})


def link(root: Path, adapter: str = "default") -> str:
    return os.readlink(root / "checkpoints" / adapter / "latest")


def record(root: Path, adapter: str = "default") -> dict:
    return json.loads((root / "checkpoints" / adapter / "latest.json").read_text())


def status_json(root: Path) -> dict:
    r = cli(root, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def metrics(root: Path) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.supervisor.spool import Spool
    from daemon.supervisor.web_metrics import FileCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FileCollector(Spool(Layout.at(root))))
    return {(s.name, s.labels.get("adapter")): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples
            if s.name.startswith("training_daemon_adapter_")}


def adapter_metrics(root: Path) -> tuple:
    m = metrics(root)
    return tuple(m.get((f"training_daemon_adapter_{k}", "default")) for k in ("latest_version", "newest_version",
                                                                              "held_versions"))


# ------------------------------------------------------------------ the record
def test_a_held_version_is_published_but_latest_stays(root):
    assert publish(root, "promoted", 1) == 1
    assert publish(root, "held", 2) == 2
    adapter = root / "checkpoints" / "default"
    assert link(root) == "v1" and versions.promoted_version(adapter) == 1
    assert record(root)["version"] == 1
    assert [(e["version"], e["by"], e["job_id"]) for e in record(root)["history"]] == [(1, "gate", 1)]
    # publish fills in what only it knows under the lock: where `latest` is after the version is in place
    assert versions.read_metadata(adapter, 2)["promotion"]["latest_after"] == 1
    assert versions.read_metadata(adapter, 1)["promotion"]["latest_after"] == 1
    assert publish(root, "promoted", 3) == 3
    assert link(root) == "v3" and record(root)["version"] == 3


def test_promote_and_rollback_move_latest_and_every_listing_shows_it(root):
    publish(root, "promoted", 1)
    publish(root, "held", 2)
    done_job(root, 1, 1)
    done_job(root, 2, 2)

    r = cli(root, "jobs")
    assert r.returncode == 0 and "v2 (held: latest stays v1)" in r.stdout, r.stdout
    assert status_json(root)["adapters"] == {"default": {"latest": 1, "newest": 2, "held": [2]}}
    assert "default: latest v1, newest v2, held v2" in cli(root, "status").stdout
    assert adapter_metrics(root) == (1, 2, 1)
    row = {j["id"]: j for j in json.loads(cli(root, "jobs", "--json").stdout)}[2]
    assert row["promotion"]["decision"] == "held" and row["promotion"]["reason"] == HELD_REASON

    r = cli(root, "promote", "default@v2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "default: latest is now v2 (was v1), promoted by hand"
    assert link(root) == "v2" and record(root)["history"][-1]["by"] == "promote"
    assert "default: latest is now v2 (was v1), promoted by hand" in (root / "status.log").read_text()
    [ev] = events(root, "promoted")
    assert {k: ev[k] for k in ("job_id", "adapter", "version", "decision", "latest")} == {
        "job_id": 2, "adapter": "default", "version": 2, "decision": "promoted", "latest": 2}
    assert HELD_REASON in ev["reason"]
    assert status_json(root)["adapters"] == {"default": {"latest": 2, "newest": 2, "held": []}}
    assert "v2 (held, promoted by hand)" in cli(root, "jobs").stdout
    assert adapter_metrics(root) == (2, 2, 0)

    r = cli(root, "rollback", "default")
    assert r.returncode == 0 and r.stdout.strip() == "default: rolled back to v1 (was v2)", r.stdout + r.stderr
    assert link(root) == "v1" and status_json(root)["adapters"]["default"]["latest"] == 1
    [ev] = events(root, "rolled_back")
    assert (ev["version"], ev["latest"], ev["was"], ev["decision"]) == (1, 1, 2, "rolled_back")
    assert adapter_metrics(root) == (1, 2, 0)

    r = cli(root, "rollback", "default")  # v1 was the first: nothing before it
    assert r.returncode != 0 and link(root) == "v1"
    assert r.stderr.strip() == "Error: default: nothing to roll back to: no version was latest before v1"
    r = cli(root, "promote", "default@v2")
    assert r.returncode == 0 and link(root) == "v2"
    r = cli(root, "promote", "default@v2")
    assert r.returncode == 0 and "already v2" in r.stdout and len(events(root, "promoted")) == 2


def test_promote_refuses_a_damaged_version_one_of_another_base_and_a_bad_name(root):
    publish(root, "promoted", 1)
    publish(root, "held", 2)
    publish(root, "held", 3, fingerprint="fp-other")
    weights = root / "checkpoints/default/v2/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    r = cli(root, "promote", "default@2")
    assert r.returncode != 0 and "version default@2 is damaged and cannot be promoted" in r.stderr
    r = cli(root, "promote", "default@3")
    assert r.returncode != 0 and "trained on another base model than latest v1" in r.stderr
    for spec, words in (("default@9", "no published version default@9"), ("default", "name a version"),
                        ("default@x", "bad version"), ("../etc@1", "adapter")):
        r = cli(root, "promote", spec)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (spec, r.stderr)
    assert link(root) == "v1" and not events(root, "promoted")
    r = cli(root, "rollback", "nothing-here")
    assert r.returncode != 0 and "has no published version" in r.stderr


def test_rollbacks_walk_back_through_promotions_and_skip_a_damaged_one(root):
    for job in (1, 2, 3, 4):
        publish(root, "promoted", job)
    (root / "checkpoints/default/v3/adapter_config.json").unlink()
    checkpoints = root / "checkpoints"
    done = promotion.rollback(checkpoints, "default")
    assert done["version"] == 2 and "skipped v3 (adapter_config.json is missing)" in done["message"]
    assert promotion.rollback(checkpoints, "default")["version"] == 1  # two rollbacks: two back, not back and forth
    promotion.promote(checkpoints, "default@4")
    assert promotion.rollback(checkpoints, "default")["version"] == 1
    assert link(root) == "v1"


def test_an_adapter_from_before_latest_json_keeps_the_newest_rule_then_gets_a_record(root):
    publish(root, "promoted", 1)
    publish(root, "promoted", 2)
    adapter = root / "checkpoints" / "default"
    (adapter / "latest.json").unlink()
    durable.swap_symlink(adapter / "latest", "v1")  # a crash before the swap, as an older daemon could leave it
    for v in (1, 2):  # an older trainer wrote no verdict
        meta = versions.read_metadata(adapter, v)
        del meta["promotion"]
        durable.write_json(adapter / f"v{v}" / "metadata.json", meta)
    assert versions.promoted_version(adapter) == 2
    assert versions.repair_latest(adapter) == ["latest.json started: latest is v2 (the newest complete version)"]
    assert link(root) == "v2" and [e["version"] for e in record(root)["history"]] == [1, 2]
    assert versions.repair_latest(adapter) == []
    assert promotion.rollback(root / "checkpoints", "default")["version"] == 1


@pytest.mark.parametrize("decision", ["promoted", "held"])
def test_a_crash_between_the_rename_and_the_record_is_repaired_by_the_verdict(root, decision):
    publish(root, "promoted", 1)
    killed = json.dumps([{"point": "published", "kind": "kill"}])
    code = ("import sys; sys.path[:0] = ['tests', '.']; from pathlib import Path; import test_promotion as t; "
            f"t.publish(Path({str(root)!r}), {decision!r}, 2)")
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env(TRAINING_DAEMON_FAULTS=killed))
    assert r.returncode == -9
    adapter = root / "checkpoints" / "default"
    assert versions.versions(adapter) == [1, 2] and link(root) == "v1" and record(root)["version"] == 1
    notes = versions.repair_latest(adapter)
    if decision == "promoted":
        assert notes == ["v2 was promoted when published; its record was cut short by a crash: latest is v2"]
        assert link(root) == "v2" and record(root)["history"][-1]["by"] == "repair"
    else:  # a held version never becomes latest by a repair
        assert notes == [] and link(root) == "v1" and record(root)["version"] == 1


@pytest.mark.parametrize("by", ["rollback", "promote"])
def test_a_gate_pass_never_undoes_a_rollback_or_promote_done_while_the_job_ran(root, by):
    from daemon.trainer.publish_step import published_fields

    publish(root, "promoted", 1)
    publish(root, "promoted", 2)  # the bad one: job 3 trains on it and is judged against it
    checkpoints, adapter = root / "checkpoints", root / "checkpoints" / "default"
    if by == "rollback":
        promotion.rollback(checkpoints, "default")
    else:
        promotion.promote(checkpoints, "default@1")
    assert publish(root, "promoted", 3, incumbent=2) == 3  # the gate passed against v2; publish takes the lock
    assert link(root) == "v1" and record(root)["version"] == 1 and versions.promoted_version(adapter) == 1
    verdict = versions.read_metadata(adapter, 3)["promotion"]
    reason = (f"latest moved from v2 to v1 during the job (by {by}): not promoted; promote it by hand if "
              "wanted")
    assert (verdict["decision"], verdict["reason"], verdict["latest_after"]) == ("held", reason, 1)
    fields = published_fields(3, versions.read_metadata(adapter, 3))  # what result.json and the event say
    assert (fields["decision"], fields["reason"], fields["latest"], fields["incumbent"]) == ("held", reason, 1, 2)
    assert publish(root, "promoted", 4) == 4 and link(root) == "v4"  # judged against latest as it is: promoted


def test_continue_never_trains_on_a_version_rolled_back_from(root):
    from daemon.trainer.parent import promoted_sound_version

    for job in (1, 2, 3):
        publish(root, "promoted", job)
    checkpoints, adapter = root / "checkpoints", root / "checkpoints" / "default"
    assert promotion.rollback(checkpoints, "default")["version"] == 2
    assert publish(root, "promoted", 4) == 4
    (adapter / "v4" / "adapter_config.json").unlink()
    assert promotion.chain(record(root)["history"]) == [1, 2, 4]
    damaged = []
    assert promoted_sound_version(adapter, lambda v, found: damaged.append(v)) == 2
    assert damaged == [4]


def test_a_lost_record_is_seeded_from_the_link_and_never_names_a_held_version(root):
    publish(root, "promoted", 1)
    publish(root, "promoted", 2)
    publish(root, "held", 3)
    adapter = root / "checkpoints" / "default"
    (adapter / "latest.json").write_text("{}")
    assert versions.promoted_version(adapter) == 2
    assert versions.repair_latest(adapter) == ["latest.json started: latest is v2 (what the latest link points at)"]
    assert link(root) == "v2" and record(root)["version"] == 2
    assert promotion.chain(record(root)["history"]) == [1, 2] and versions.repair_latest(adapter) == []
    (adapter / "latest.json").unlink()
    (adapter / "latest").unlink()  # no link either: the newest version the gate did not hold
    assert versions.promoted_version(adapter) == 2
    assert versions.repair_latest(adapter) == ["latest.json started: latest is v2 (the newest complete version)"]
    assert link(root) == "v2"
    promotion.promote(root / "checkpoints", "default@3")  # held, then promoted by hand: the link says so
    (adapter / "latest.json").write_text("not json")
    assert versions.promoted_version(adapter) == 3
    versions.repair_latest(adapter)
    assert link(root) == "v3" and promotion.chain(record(root)["history"]) == [1, 2, 3]


def test_a_promote_waits_for_a_publish_in_progress(root):
    publish(root, "promoted", 1)
    publish(root, "held", 2)
    layout = Layout.at(root)
    said = []
    with promotion.locked(root / "checkpoints" / "default"):  # as the trainer's publish holds it
        t = threading.Thread(target=lambda: said.append(latest_commands.promote(layout, "default@2")))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and link(root) == "v1"
    t.join(10)
    assert said == ["default: latest is now v2 (was v1), promoted by hand"] and link(root) == "v2"


# ------------------------------------------------------------------ what the daemon says
def test_the_daemon_says_held_in_status_log_events_and_the_job_done_line(root):
    layout = Layout.at(root).ensure()
    status = StatusWriter(layout, echo=False)
    job = Job(id=7, adapter="default", original_name="b.jsonl")
    trainer_events.report({"event": Event.PUBLISHED, "version": 5, "path": "/x/v5", "decision": "held",
                           "reason": "standing eval loss 1.84 vs 1.21 for v4 (+52%)", "latest": 4, "incumbent": 4},
                          job, {}, status)
    trainer_events.report({"event": Event.PUBLISHED, "version": 6, "path": "/x/v6"}, job, {}, status)  # older trainer
    log = (root / "status.log").read_text()
    assert "job 7: v5 held: standing eval loss 1.84 vs 1.21 for v4 (+52%); latest stays v4\n" in log
    assert "job 7: published version 6, now latest\n" in log
    [held] = events(root, "held")
    [published] = events(root, "published")
    assert {k: held[k] for k in ("job_id", "adapter", "version", "decision", "latest")} == {
        "job_id": 7, "adapter": "default", "version": 5, "decision": "held", "latest": 4}
    assert (published["decision"], published["latest"]) == ("promoted", 6)

    job.version = 5
    outcome = Outcome(OutcomeKind.DONE, version=5, path="/x/v5", decision="held", latest=4)
    decision_log.say(status, job, root, outcome, Decision(job.state, Verdict.DONE), 1, None)
    assert "job 7 done: default v5 at /x/v5 (held: latest stays v4)" in (root / "status.log").read_text()


# ------------------------------------------------------------------ end to end: the real gate holds a version
@pytest.mark.slow
def test_a_real_job_held_by_the_gate_shows_everywhere_and_can_be_promoted(root, tiny_model_dir):
    (root / "config").mkdir()
    (root / "config" / "standing.jsonl").write_text("\n".join(chat_lines(4, "pear")) + "\n")
    # better with tolerance 1.0: a new version must reach zero loss to pass, so the second one is held
    write_config(root, tiny_model_dir, versions={"promotion": "better", "tolerance": 1.0,
                                                 "eval_file": "standing.jsonl",
                                                 "probes": [{"prompt": "What is pear number 1?"}],
                                                 "probe_max_new_tokens": 4})
    drop(root, "first.jsonl", chat_lines(6, "apple"))
    assert cli(root, "run", "--once").returncode == 0
    drop(root, "second.jsonl", chat_lines(6, "plum"))
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr  # a held version is a done job, not a failed one

    [held] = events(root, "held")
    assert (held["job_id"], held["version"], held["latest"], held["decision"]) == (2, 2, 1, "held")
    assert held["reason"].startswith("standing eval loss ") and "for v1" in held["reason"]
    assert f"job 2: v2 held: {held['reason']}; latest stays v1" in (root / "status.log").read_text()
    assert link(root) == "v1"
    assert "v2 (held: latest stays v1)" in cli(root, "jobs").stdout
    assert status_json(root)["adapters"] == {"default": {"latest": 1, "newest": 2, "held": [2]}}
    assert adapter_metrics(root) == (1, 2, 1)

    from daemon.supervisor.web import start_web
    from test_web import get_json

    server = start_web(Layout.at(root), "127.0.0.1", 0)
    try:
        [adapter] = get_json(server, "/api/adapters")
        assert (adapter["latest"], adapter["newest"], adapter["held"]) == (1, 2, [2])
        j = adapter["newest_judgement"]
        assert (j["version"], j["decision"], j["incumbent_version"]) == (2, "held", 1)
        [probe] = j["probes"]
        assert probe["prompt"] == "What is pear number 1?" and isinstance(probe["answer"], str)
        assert isinstance(probe["incumbent_answer"], str)
        assert {v["version"]: v["held"] for v in get_json(server, "/api/versions")} == {2: True, 1: False}

        assert cli(root, "promote", "default@2").returncode == 0
        assert get_json(server, "/api/status")["adapters"]["default"] == {"latest": 2, "newest": 2, "held": []}
        assert {v["version"]: v["latest"] for v in get_json(server, "/api/versions")} == {2: True, 1: False}
    finally:
        server.stop()
    assert adapter_metrics(root) == (2, 2, 0)
    r = cli(root, "compare", "default@1", "default@2")
    assert r.returncode == 0 and "What is pear number 1?" in r.stdout and "held: standing eval loss" in r.stdout
