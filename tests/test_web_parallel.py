"""Several jobs training at once, as the status page, its API and /metrics show them: a card per running job
drawn by the page's own JS in headless Chromium, per-job series beside the old current_* ones, and a status.json
of the previous version (one job, no `running`) still read."""

from __future__ import annotations

import json
import os
import time

import pytest

import test_web
from daemon.paths import Layout
from daemon.supervisor.status import StatusWriter
from daemon.supervisor.web import start_web
from test_web import ARTIFACTS, Browser, get, get_json, make_job, needs_chromium

site = test_web.site  # the shared fixture (imported by assignment: a fixture imported by name trips ruff's F811)


def two_jobs_snapshot(writer: StatusWriter, **first) -> None:
    """What a daemon training two jobs side by side writes: job 7 on GPU 0, job 8 in Slurm, still loading."""
    running = [{"job_id": 7, "adapter": "alpha", "file": "a.jsonl", "phase": "training", "step": 40,
                "total_steps": 100, "loss": 0.5, "eval_loss": None, "tokens_per_s": 2000.0, "eta_s": 90,
                "gpu_mem_gib": 3.0, "gpu_peak_card_gib": 3.6, "devices": ["0"], "slot": "gpu0", "executor": "local",
                **first},
               {"job_id": 8, "adapter": "beta", "file": "b.jsonl", "phase": "loading", "step": 0, "total_steps": None,
                "loss": None, "eval_loss": None, "tokens_per_s": None, "eta_s": None, "gpu_mem_gib": None,
                "devices": None, "slot": "slurm", "executor": "slurm", "slurm_job_id": "4501"}]
    writer.snapshot({"daemon": {"pid": os.getpid(), "state": "training", "root": str(writer.layout.root),
                                "version": "0.2.0", "parallel": {"running": 2, "max": 4}},
                     "running": running, "current": running[0],
                     "queue": {"pending": 0, "running": 2, "done": 2, "failed": 1}, "gpu": None})


def scrape(server) -> dict:
    """/metrics through Prometheus' own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    code, ctype, body = get(server.url + "metrics")
    assert code == 200 and ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_api_and_metrics_show_every_running_job(site):
    layout, writer, server = site
    two_jobs_snapshot(writer)
    answer = get_json(server, "/api/status")
    assert [j["job_id"] for j in answer["running"]] == [7, 8] and answer["daemon"]["parallel"] == {"running": 2,
                                                                                                     "max": 4}
    m = scrape(server)
    assert m[("training_daemon_running_jobs", ())] == 2 and m[("training_daemon_max_parallel_jobs", ())] == 4
    assert m[("training_daemon_job_step", (("adapter", "alpha"), ("job_id", "7")))] == 40
    assert m[("training_daemon_job_total_steps", (("adapter", "alpha"), ("job_id", "7")))] == 100
    assert m[("training_daemon_job_loss", (("adapter", "alpha"), ("job_id", "7")))] == 0.5
    assert m[("training_daemon_job_tokens_per_second", (("adapter", "alpha"), ("job_id", "7")))] == 2000
    assert m[("training_daemon_job_gpu_card_peak_gib", (("adapter", "alpha"), ("job_id", "7")))] == 3.6
    assert m[("training_daemon_job_step", (("adapter", "beta"), ("job_id", "8")))] == 0
    assert ("training_daemon_job_loss", (("adapter", "beta"), ("job_id", "8"))) not in m  # no loss yet: no sample
    assert m[("training_daemon_job_info", (("adapter", "beta"), ("executor", "slurm"), ("job_id", "8"),
                                           ("phase", "loading"), ("slot", "slurm")))] == 1
    # The current_* series stay, for the oldest running job, as dashboards made for one job read them.
    assert m[("training_daemon_current_job_id", (("adapter", "alpha"),))] == 7
    assert m[("training_daemon_current_step", (("adapter", "alpha"),))] == 40
    assert m[("training_daemon_training", ())] == 1
    assert m[("training_daemon_prepared_jobs", ())] == 0
    # One job trains and the next is prepared by an early trainer, waiting for the GPU: counted apart.
    writer.snapshot({**json.loads(layout.status_json.read_text()),
                     "daemon": {"state": "training", "parallel": {"running": 1, "prepared": 1, "max": 1}}})
    m = scrape(server)
    assert m[("training_daemon_running_jobs", ())] == 1 and m[("training_daemon_prepared_jobs", ())] == 1
    # Job 7 ends: its series go with it.
    writer.snapshot({**json.loads(layout.status_json.read_text()), "running": [], "current": None,
                     "daemon": {"state": "idle", "parallel": {"running": 0, "max": 4}}})
    m = scrape(server)
    assert m[("training_daemon_running_jobs", ())] == 0 and m[("training_daemon_training", ())] == 0
    assert not [k for k in m if k[0].startswith(("training_daemon_job_", "training_daemon_current_"))]


def test_metrics_of_a_daemon_of_the_previous_version(site):
    """status.json with `current` only (no `running`, no `parallel`): one running job, one at a time."""
    _, _, server = site
    m = scrape(server)
    assert m[("training_daemon_running_jobs", ())] == 1 and m[("training_daemon_max_parallel_jobs", ())] == 1
    assert m[("training_daemon_job_step", (("adapter", "default"), ("job_id", "3")))] == 10
    assert m[("training_daemon_current_step", (("adapter", "default"),))] == 10


@needs_chromium
def test_page_in_headless_chromium_shows_every_running_job(root):
    """Two jobs training side by side: the page's own JS draws a card for each, with its own progress and place;
    a click on a card shows that job's loss; when jobs end their cards go."""
    pytest.importorskip("websocket", reason="pip install websocket-client")
    layout = Layout.at(root).ensure()
    writer = StatusWriter(layout, echo=False)
    make_job(layout, 7, "running", adapter="alpha")
    make_job(layout, 8, "running", adapter="beta")
    for step in range(1, 5):
        writer.event("progress", "", job_id=7, step=step * 10, total_steps=100, loss=2.0 / step)
    two_jobs_snapshot(writer)
    server = start_web(layout, "127.0.0.1", 0)
    browser = Browser(server.url)
    try:
        browser.wait_for("document.querySelectorAll('#running > .job').length === 2")
        first, second = browser.cards()
        assert first["title"] == "job 7: a.jsonl \u2192 alpha (training)" and first["where"] == "GPU 0"
        assert first["progress"] == "step 40/100 (40%)" and first["bar"] == "40%" and first["loss"] == "0.5000"
        assert first["speed"] == "2,000 tok/s" and first["eta"] == "1:30"
        assert first["mem"] == "3.00 GiB, card peak 3.60 GiB"
        assert second["title"] == "job 8: b.jsonl \u2192 beta (loading)" and second["where"] == "Slurm job 4501"
        assert second["progress"] == "step 0/? (0%)" and second["loss"] == "?" and second["bar"] == "0%"
        assert first["visible"] and second["visible"]
        time.sleep(0.5)  # the bars' CSS transition, for the picture
        print(f"\nscreenshot: {browser.screenshot(ARTIFACTS / 'web-status-parallel.png')}")
        assert browser.eval("document.getElementById('current-none').hidden")
        shown_parallel = "document.getElementById('parallel').textContent"
        assert browser.eval(shown_parallel) == "\u00b7 2 running, at most 4 at a time"
        # The chart follows the oldest running job until a card is clicked.
        browser.wait_for("+document.getElementById('chart').dataset.points === 4")
        assert browser.eval("document.getElementById('chart-job').textContent") == "job 7"
        browser.eval("document.querySelector('#running > .job[data-job=\"8\"]').click()")
        browser.wait_for("document.getElementById('chart-job').textContent === 'job 8'")
        assert [c["selected"] for c in browser.cards()] == [False, True]
        # Job 7 moves on; then it ends while job 8 trains; then job 8 ends too.
        two_jobs_snapshot(writer, step=60, loss=0.25)
        browser.wait_for("document.querySelector('#running > .job').querySelector('.progress-text').textContent"
                         ".startsWith('step 60/100')")
        only_8 = json.loads(layout.status_json.read_text())["running"][1:]
        only_8[0].update(phase="training", step=5, total_steps=50, loss=1.5)
        writer.snapshot({"daemon": {"state": "training", "parallel": {"running": 1, "max": 4}}, "running": only_8,
                         "current": only_8[0]})
        browser.wait_for("document.querySelectorAll('#running > .job').length === 1")
        [card] = browser.cards()
        assert card["job"] == 8 and card["progress"] == "step 5/50 (10%)" and card["where"] == "Slurm job 4501"
        writer.snapshot({"daemon": {"state": "idle", "parallel": {"running": 0, "max": 4}}, "running": [],
                         "current": None})
        browser.wait_for("!document.getElementById('current-none').hidden")
        assert browser.cards() == []
        assert browser.eval(shown_parallel) == "\u00b7 0 running, at most 4 at a time"
    finally:
        browser.close()
        server.stop()
