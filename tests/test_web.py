"""The status page and its API over real HTTP, /metrics through Prometheus' own parser, and the page itself
in headless Chromium (skipped when chromium is not installed)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon import durable
from daemon import versions as publish
from daemon.paths import PROJECT_DIR, Layout
from daemon.supervisor.job import dir_name
from daemon.trainer.plots import plot_loss
from daemon.supervisor.status import StatusWriter
from daemon.supervisor.web import start_web
from helpers import chat_lines, drop, events, jobs, start_daemon, wait_for, write_config


def get(url: str, host: str | None = None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def get_json(server, path: str):
    code, ctype, body = get(server.url.rstrip("/") + path)
    assert code == 200 and ctype == "application/json", (code, body)
    return json.loads(body)


def make_job(layout: Layout, job_id: int, state: str, **fields) -> None:
    d = layout.state_dir(state) / dir_name(job_id)
    d.mkdir(parents=True)
    durable.write_json(d / "job.json", {"id": job_id, "adapter": "default", "original_name": f"file{job_id}.jsonl",
                                        "state": state, **fields})


def publish_version(layout: Layout, job_id: int, losses, evals, plot: bool) -> None:
    adapter_dir = layout.adapter_dir("default")
    staged = publish.staging_dir(adapter_dir, job_id)
    if plot:
        plot_loss(losses, evals, staged / "loss.png", f"default job {job_id}")
    publish.publish(adapter_dir, staged, {"adapter": "default", "job_id": job_id, "source_file": f"file{job_id}.jsonl",
                                          "steps": len(losses), "first_train_loss": losses[0][1],
                                          "final_train_loss": losses[-1][1], "eval_loss": evals[-1][1],
                                          "training_seconds": 12.5, "loss_plot": "loss.png" if plot else None,
                                          "loss_history": losses, "eval_history": evals})


def training_snapshot(writer: StatusWriter, job_id: int, step: int, total: int, loss: float | None = None, **extra):
    writer.snapshot({"daemon": {"pid": os.getpid(), "state": "training", "root": str(writer.layout.root),
                                "version": "0.1.0"},
                     "current": {"job_id": job_id, "adapter": "default", "file": f"file{job_id}.jsonl",
                                 "phase": "training", "step": step, "total_steps": total, "loss": loss,
                                 "tokens_per_s": 1234.0, "eta_s": total - step, "gpu_mem_gib": 1.5, **extra},
                     "queue": {"pending": 1, "running": 1, "done": 2, "failed": 1},
                     "gpu": {"name": "Test GPU", "mem_used_gib": 2.0, "mem_total_gib": 8.0, "util_percent": 87.0}})


def trainer_step(writer: StatusWriter, job_id: int, step: int, total: int, loss: float) -> None:
    """What the daemon records for one progress event from its trainer child."""
    writer.event("progress", f"job {job_id} step {step}/{total} loss {loss:.4f}", job_id=job_id, step=step,
                 total_steps=total, loss=loss, tokens_per_s=1234.0, eta_s=total - step, gpu_mem_gib=1.5)
    training_snapshot(writer, job_id, step, total, loss)


@pytest.fixture
def site(root):
    """A root with two published versions, jobs in every state, and job 3 training at step 10 of 20."""
    layout = Layout.at(root).ensure()
    writer = StatusWriter(layout, echo=False)
    publish_version(layout, 1, [[1, 3.0], [2, 2.5]], [[2, 2.8]], plot=False)
    publish_version(layout, 2, [[s, 3.0 / s] for s in range(1, 9)], [[4, 1.0], [8, 0.6]], plot=True)
    make_job(layout, 1, "done", version=1)
    make_job(layout, 2, "done", version=2)
    make_job(layout, 3, "running")
    make_job(layout, 4, "pending")
    make_job(layout, 5, "failed", error="line 1: not JSON\ntraceback")
    for step in range(1, 11):
        trainer_step(writer, 3, step, 20, 4.0 / step)
    writer.event("eval", "job 3: eval loss 0.9", job_id=3, step=5, eval_loss=0.9)
    writer.event("eval", "job 3: eval loss 0.5", job_id=3, step=10, eval_loss=0.5)
    server = start_web(layout, "127.0.0.1", 0)
    yield layout, writer, server
    server.stop()


def test_server_binds_any_free_port_and_stops(root):
    server = start_web(Layout.at(root), "127.0.0.1", 0)
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    assert get(server.url)[0] == 200
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


def test_page_is_self_contained_html(site):
    _, _, server = site
    code, ctype, body = get(server.url)
    html = body.decode()
    assert code == 200 and ctype.startswith("text/html")
    assert '<canvas id="chart"' in html and "/api/loss" in html and "setInterval(poll, 1000)" in html
    # No external assets: no src=/href= pointing off the page.
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_api_status_jobs_versions(site):
    layout, _, server = site
    answer = get_json(server, "/api/status")
    assert answer.pop("adapters") == {"default": {"latest": 2, "newest": 2, "held": []}}  # as `status --json`
    assert answer == json.loads(layout.status_json.read_text())
    jobs = get_json(server, "/api/jobs")
    assert [(j["id"], j["state"]) for j in jobs] == [(1, "done"), (2, "done"), (3, "running"), (4, "pending"),
                                                    (5, "failed")]
    assert [j["id"] for j in get_json(server, "/api/jobs?state=failed")] == [5]
    assert [j["id"] for j in get_json(server, "/api/jobs?limit=2")] == [4, 5]
    versions = get_json(server, "/api/versions")
    assert [(v["version"], v["latest"], v["job_id"]) for v in versions] == [(2, True, 2), (1, False, 1)]
    assert versions[0]["final_train_loss"] == 3.0 / 8 and versions[0]["eval_loss"] == 0.6
    assert "loss_history" not in versions[0]  # the list stays small; /api/loss has the curves
    assert versions[1]["loss_plot_url"] is None
    code, ctype, png = get(server.url.rstrip("/") + versions[0]["loss_plot_url"])
    assert code == 200 and ctype == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert get(server.url + "plots/..%2F..%2Fetc/v1.png")[0] == 404
    assert get(server.url + "api/nothing")[0] == 404


def test_api_loss_follows_the_events_file(site):
    layout, writer, server = site
    loss = get_json(server, "/api/loss")  # no job given: the current one
    assert loss["job_id"] == 3 and loss["total_steps"] == 20 and loss["source"] == "events"
    assert [p[0] for p in loss["train"]] == list(range(1, 11)) and loss["eval"] == [[5, 0.9], [10, 0.5]]
    trainer_step(writer, 3, 11, 20, 0.35)
    assert get_json(server, "/api/loss?job=3")["train"][-1] == [11, 0.35]  # read incrementally
    # A retried job resumes from its step-8 checkpoint: the curve continues from there, not twice.
    trainer_step(writer, 3, 9, 20, 0.45)
    assert [p[0] for p in get_json(server, "/api/loss?job=3")["train"]][-3:] == [7, 8, 9]
    # Rotation: the next events land in a fresh events.jsonl; the index keeps what it had and reads on.
    os.rename(layout.events, layout.root / "events.jsonl.1")
    trainer_step(writer, 3, 10, 20, 0.3)
    assert [p[0] for p in get_json(server, "/api/loss?job=3")["train"]][-3:] == [8, 9, 10]
    # A finished job whose events are gone: its curve comes from the version's metadata.
    old = get_json(server, "/api/loss?job=2")
    assert old["source"] == "metadata" and len(old["train"]) == 8 and old["eval"] == [[4, 1.0], [8, 0.6]]
    assert get_json(server, "/api/loss?job=99")["train"] == []
    code, _, body = get(server.url + "api/loss?job=abc")
    assert code == 400 and json.loads(body)["error"].startswith("job must be a whole number from 0 to")


def test_metrics_read_the_files_at_every_scrape(site):
    from prometheus_client.parser import text_string_to_metric_families

    _, writer, server = site

    def scrape() -> dict:
        code, ctype, body = get(server.url + "metrics")
        assert code == 200 and ctype.startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    m = scrape()
    assert m[("training_daemon_jobs", (("state", "done"),))] == 2
    assert m[("training_daemon_jobs", (("state", "failed"),))] == 1
    assert m[("training_daemon_current_step", (("adapter", "default"),))] == 10
    assert m[("training_daemon_current_loss", (("adapter", "default"),))] == pytest.approx(0.4)
    assert m[("training_daemon_current_tokens_per_second", (("adapter", "default"),))] == 1234
    assert m[("training_daemon_gpu_memory_used_bytes", ())] == 2 * 2**30
    assert m[("training_daemon_gpu_utilization_percent", ())] == 87
    assert m[("training_daemon_adapter_latest_version", (("adapter", "default"),))] == 2
    assert m[("training_daemon_training", ())] == 1
    assert 0 <= m[("training_daemon_status_age_seconds", ())] < 30
    trainer_step(writer, 3, 12, 20, 0.25)
    assert scrape()[("training_daemon_current_step", (("adapter", "default"),))] == 12


def test_only_loopback_host_names_are_served(site):
    _, _, server = site
    assert get(server.url + "api/status", host="evil.example:80")[0] == 403
    assert get(server.url + "api/status", host=f"localhost:{server.port}")[0] == 200


# ---------------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARTIFACTS = PROJECT_DIR / "artifacts"


class Browser:
    """Headless Chromium driven over the DevTools protocol (pip: websocket-client); no downloads."""

    def __init__(self, url: str, timeout: float = 30):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="td-chromium-")
        self.log = open(Path(self.profile) / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--window-size=1280,1100", url],
            stdout=self.log, stderr=subprocess.STDOUT)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = [t for t in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
                     if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15):
        error = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.eval(expression)
            except RuntimeError as e:  # the page may still be loading
                value, error = None, e
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied {expression!r}; last error {error!r}")
            time.sleep(0.1)

    def shown(self) -> dict:
        """What a person sees: the texts of the key elements and the chart's data attributes."""
        first = self.cards()[:1] or [{"progress": "", "loss": "", "eta": "", "bar": ""}]  # the oldest running job
        return {**{k: first[0][k] for k in ("progress", "loss", "eta", "bar")}, **self.eval(
            """(() => { const t = id => document.getElementById(id).textContent;
            const c = document.getElementById('chart');
            return {state: t('daemon-state'), gpu: t('gpu-mem'), queue: t('queue'),
                    points: +c.dataset.points, evalPoints: +c.dataset.evalPoints, lastStep: +c.dataset.lastStep,
                    jobs: document.getElementById('jobs').rows.length,
                    versions: document.getElementById('versions').rows.length}; })()""")}

    def cards(self) -> list[dict]:
        """Each running job's card as shown, top to bottom."""
        return self.eval("""[...document.querySelectorAll('#running > .job')].map(card => {
            const t = cls => card.querySelector('.' + cls).textContent;
            return {job: +card.dataset.job, title: t('job-title'), where: t('job-where'), progress: t('progress-text'),
                    loss: t('loss'), evalLoss: t('eval-loss'), speed: t('tps'), eta: t('eta'), mem: t('job-mem'),
                    bar: card.querySelector('.job-bar').style.width, selected: card.classList.contains('sel'),
                    visible: card.offsetParent !== null}; })""")

    def curve_pixels(self) -> int:
        """Pixels of the train curve's colour on the canvas: proof the curve was drawn, not just counted."""
        return self.eval("""(() => { const c = document.getElementById('chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 31) < 30 && Math.abs(d[i + 1] - 119) < 30
                && Math.abs(d[i + 2] - 180) < 30 && d[i + 3] > 200) n++;
            return n; })()""")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The page's content, not the empty window below it.
        height = self.eval("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)") + 4
        clip = {"x": 0, "y": 0, "width": self.eval("window.innerWidth"), "height": height, "scale": 1}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png", clip=clip)["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


@needs_chromium
def test_page_in_headless_chromium_shows_every_reading(root):
    """Recorded events with known numbers (GPU readings included, which a CPU runner never has): every field."""
    pytest.importorskip("websocket", reason="pip install websocket-client")
    layout = Layout.at(root).ensure()
    writer = StatusWriter(layout, echo=False)
    publish_version(layout, 1, [[s, 3.0 / s] for s in range(1, 9)], [[8, 0.6]], plot=True)
    make_job(layout, 1, "done", version=1)
    make_job(layout, 2, "running")
    make_job(layout, 3, "pending")
    training_snapshot(writer, 2, 0, 20)
    server = start_web(layout, "127.0.0.1", 0)
    browser = Browser(server.url)
    try:
        browser.wait_for("document.getElementById('daemon-state').textContent.startsWith('training')")
        browser.wait_for("document.getElementById('versions').rows.length === 1")
        assert browser.shown()["points"] == 0
        # Now the trainer makes progress, one event at a time, as the daemon would record it.
        for step in range(1, 11):
            trainer_step(writer, 2, step, 20, 3.0 * 0.8 ** step)
            time.sleep(0.05)
        writer.event("eval", "job 2: eval loss 0.4", job_id=2, step=10, eval_loss=0.4)
        browser.wait_for("""(() => { const c = document.getElementById('chart');
            return +c.dataset.points === 10 && +c.dataset.evalPoints === 1
                && document.querySelector('#running .progress-text').textContent.startsWith('step 10/20'); })()""")
        shown = browser.shown()
        assert shown["bar"] == "50%" and shown["loss"] == f"{3.0 * 0.8 ** 10:.4f}" and shown["eta"] == "0:10"
        assert shown["gpu"] == "2.0 / 8.0 GiB" and shown["queue"].startswith("1 pending")
        assert shown["jobs"] == 3 and shown["lastStep"] == 10
        assert len(browser.cards()) == 1  # this status.json has `current` only, as the previous version wrote it
        assert browser.curve_pixels() > 100
    finally:
        browser.close()
        server.stop()


@needs_chromium
@pytest.mark.slow
def test_page_in_headless_chromium_follows_training(root, tiny_model_dir):
    """The real daemon trains the tiny model while headless Chromium watches the page the daemon serves."""
    pytest.importorskip("websocket", reason="pip install websocket-client")
    # The largest learning rate allowed, so that even the tiny random model's loss visibly falls.
    write_config(root, tiny_model_dir, training={"epochs": 3, "eval_fraction": 0.1, "checkpoint_every_steps": 1000,
                                                 "learning_rate": 1e-2},
                 status={"progress_every_steps": 1, "web": {"enabled": True, "port": 0}})
    # Each step also sleeps a little (the fault hooks' `sleep` kind), so that the page is seen mid-job.
    slow_steps = json.dumps([{"point": "train_step", "kind": "sleep", "seconds": 0.4}])
    daemon = start_daemon(root, TRAINING_DAEMON_FAULTS=slow_steps)
    browser = None
    try:
        url = wait_for(lambda: [e["url"] for e in events(root, "web")], timeout=60, what="the status page")[0]
        browser = Browser(url)
        browser.wait_for("document.getElementById('daemon-state').textContent.startsWith('idle')")
        assert browser.shown()["points"] == 0
        drop(root, "chats.jsonl", chat_lines(60, "plum"))

        chart_points = "+document.getElementById('chart').dataset.points"
        browser.wait_for(f"{chart_points} >= 3 && /^step \\d+\\/\\d+/.test((document.querySelector('#running "
                         ".progress-text') || {}).textContent)", timeout=120)
        first = browser.shown()
        total = int(re.match(r"step \d+/(\d+)", first["progress"]).group(1))
        # It keeps up with training; at 60% the picture shows a curve with a future.
        browser.wait_for(f"{chart_points} >= {max(first['points'] + 3, round(0.6 * total))}", timeout=60)
        during = browser.shown()
        step = int(re.match(r"step (\d+)/", during["progress"]).group(1))
        assert during["state"].startswith("training") and step < total, during
        assert 0 < float(during["bar"].rstrip("%")) < 100 and float(during["loss"]) > 0, during
        assert during["lastStep"] >= first["lastStep"] + 3 and browser.curve_pixels() > 100
        time.sleep(0.5)  # let the progress bar's CSS transition finish for the picture
        shot = browser.screenshot(ARTIFACTS / "web-status-training.png")
        print(f"\nscreenshot during training: {shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The end: the version is listed, the whole curve drawn, and the daemon (its status lags the events by
        # up to a second) no longer training.
        browser.wait_for(f"""document.getElementById('versions').rows.length === 1 && {chart_points} === {total}
            && !document.getElementById('daemon-state').textContent.startsWith('training')""", timeout=120)
        done = browser.shown()
        assert done["evalPoints"] >= 1 and done["jobs"] == 1, done
        [job] = jobs(root)
        assert job["state"] == "done", job
    finally:
        if browser:
            browser.close()
        daemon.terminate()
        daemon.wait(60)
