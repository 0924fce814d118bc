"""The status page served at `/` by daemon/supervisor/web.py: one self-contained HTML document.

No external assets (it must work offline and behind a firewall): inline CSS, and inline JS that polls the
JSON API every second and draws the loss chart on a <canvas>. The element ids, and the class names inside a
running job's card (#running > .job, one per job in status.json's `running`), are what tests look for.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>training-daemon</title>
<style>
 :root { --fg:#1d2330; --muted:#6b7280; --line:#e5e7eb; --train:#1f77b4; --eval:#ff7f0e; --bad:#b91c1c; }
 body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); margin: 0; background: #f7f8fa; }
 header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: baseline; }
 header h1 { font-size: 18px; margin: 0; }
 main { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); gap: 16px; padding: 16px 20px; }
 section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
 h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin: 0 0 8px; }
 .wide { grid-column: 1 / -1; }
 .bar { height: 14px; background: var(--line); border-radius: 7px; overflow: hidden; margin: 6px 0; }
 .bar > div { height: 100%; background: var(--train); width: 0; transition: width .4s; }
 dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
 dl > .rows { display: contents; } dl > .rows[hidden] { display: none; }
 dt { color: var(--muted); } dd { margin: 0; font-variant-numeric: tabular-nums; }
 table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: 3px 8px 3px 0; border-bottom: 1px solid var(--line); }
 tr.sel, .job.sel { background: #eef4fb; } tbody tr, .job { cursor: pointer; }
 .job { padding: 6px; margin: 0 -6px 8px; border-radius: 6px; } .job + .job { border-top: 1px solid var(--line); }
 .failed { color: var(--bad); } .muted { color: var(--muted); } .stale { color: #fbbf24; }
 canvas { width: 100%; height: 300px; display: block; }
 .legend span { margin-right: 14px; } .legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
</style></head>
<body>
<header><h1>training-daemon</h1><span id="daemon-state">connecting...</span><span id="updated" class="muted"></span></header>
<main>
 <section><h2>Loss <span id="chart-job" class="muted"></span></h2>
  <canvas id="chart" data-points="0" data-eval-points="0" data-last-step="0"></canvas>
  <div class="legend muted"><span><i style="background:var(--train)"></i>train</span><span><i style="background:var(--eval)"></i>eval</span></div>
 </section>
 <section><h2>Training <span id="parallel" class="muted"></span></h2>
  <div id="current-none" class="muted">no job is training</div>
  <div id="running"></div>
  <template id="job-card"><div class="job" title="show this job's loss">
   <div class="job-title"></div><div class="job-where muted"></div>
   <div class="bar"><div class="job-bar"></div></div>
   <dl><dt>progress</dt><dd class="progress-text"></dd><dt>loss</dt><dd class="loss"></dd><dt>eval loss</dt><dd class="eval-loss"></dd>
    <dt>speed</dt><dd class="tps"></dd><dt>ETA</dt><dd class="eta"></dd><dt>GPU (job)</dt><dd class="job-mem"></dd></dl>
  </div></template>
  <h2 style="margin-top:14px">GPU</h2><dl><dt>device</dt><dd id="gpu-name">none visible</dd>
   <div id="gpu-readings" class="rows" hidden><dt>memory</dt><dd id="gpu-mem"></dd><dt>busy</dt><dd id="gpu-util"></dd></div></dl>
  <h2 style="margin-top:14px">Queue</h2><div id="queue"></div>
 </section>
 <section class="wide"><h2>Jobs</h2><table><thead><tr><th>id</th><th>state</th><th>adapter</th><th>file</th><th>version</th><th>note</th></tr></thead><tbody id="jobs"></tbody></table></section>
 <section class="wide"><h2>Adapters</h2><table><thead><tr><th>adapter</th><th>latest</th><th>newest</th><th>held</th><th>newest version's verdict</th></tr></thead><tbody id="adapters"></tbody></table>
  <div id="probes"></div></section>
 <section class="wide"><h2>Versions</h2><table><thead><tr><th>adapter</th><th>version</th><th>job</th><th>file</th><th>steps</th><th>first loss</th><th>final loss</th><th>eval loss</th><th>time</th><th>finished</th><th>plot</th></tr></thead><tbody id="versions"></tbody></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let selectedJob = null, lastChart = null, tick = 0;

function fmtDur(s) {
  if (s === null || s === undefined) return "?";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}
function fmtEta(s) {  // clock style, as timefmt.fmt_eta writes it in the terminal and the journal
  if (s === null || s === undefined) return "?";
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = String(s % 60).padStart(2, "0");
  return h ? h + ":" + String(m).padStart(2, "0") + ":" + sec : m + ":" + sec;
}
const num = (v, d) => (v === null || v === undefined) ? "?" : Number(v).toFixed(d);
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text ?? ""; if (cls) td.className = cls; tr.appendChild(td); return td; }
async function getJSON(url) { const r = await fetch(url, {cache: "no-store"}); if (!r.ok) throw new Error(url + ": " + r.status); return r.json(); }

function renderStatus(st) {
  const d = st.daemon || {}, age = st.updated_unix ? Date.now() / 1000 - st.updated_unix : null;
  $("daemon-state").textContent = d.state ? d.state + (d.pid ? " (pid " + d.pid + ")" : "")
    + (d.blocked ? ": no job starts until this is fixed: " + d.blocked.reason : "") : "no status yet";
  $("updated").textContent = age === null ? "" : (age > 10 ? "status not updated for " + fmtDur(age) : "updated " + fmtDur(age) + " ago");
  $("updated").className = age !== null && age > 10 ? "stale" : "muted";
  const running = Array.isArray(st.running) ? st.running : (st.current ? [st.current] : []);  // an older daemon: current only
  renderRunning(running);
  const par = d.parallel;
  $("parallel").textContent = par && (par.max > 1 || running.length > 1) ? "\u00b7 " + running.length + " running, at most " + (par.max ?? "?") + " at a time" : "";
  const g = st.gpu;
  $("gpu-name").textContent = g ? g.name : "none visible"; $("gpu-readings").hidden = !g;
  $("gpu-mem").textContent = g ? num(g.mem_used_gib, 1) + " / " + num(g.mem_total_gib, 1) + " GiB" : "";
  $("gpu-util").textContent = g && g.util_percent != null ? num(g.util_percent, 0) + "%" : "";
  const q = st.queue || {};
  $("queue").textContent = ["pending", "running", "done", "failed"].map(k => (q[k] || 0) + " " + k).join(" \u00b7 ");
  return running.length ? running[0].job_id : null;
}

// Where a job trains, as `training-daemon status` says it (console.placement).
function placement(c) {
  if (c.executor === "slurm") return "Slurm job " + (c.slurm_job_id || "?");
  if (c.devices && c.devices.length) return "GPU " + c.devices.join(",");
  return c.slot ? "slot " + c.slot : "";
}

// One card per running job, oldest first. A card lives as long as its job runs, so that its bar glides.
const cards = new Map();
function renderRunning(running) {
  $("current-none").hidden = running.length > 0;
  const ids = new Set(running.map(c => c.job_id));
  for (const id of cards.keys()) if (!ids.has(id)) cards.delete(id);
  const wanted = running.map(c => {
    let card = cards.get(c.job_id);
    if (!card) {
      card = $("job-card").content.firstElementChild.cloneNode(true);
      card.onclick = () => { selectedJob = (selectedJob === c.job_id ? null : c.job_id); poll(true); };
      cards.set(c.job_id, card);
    }
    fillCard(card, c);
    return card;
  });
  const box = $("running");
  if (wanted.length !== box.children.length || wanted.some((card, i) => box.children[i] !== card)) box.replaceChildren(...wanted);
}

function fillCard(card, c) {
  const q = (cls) => card.querySelector("." + cls);
  const pct = c.total_steps ? Math.min(100, 100 * (c.step || 0) / c.total_steps) : 0;
  card.dataset.job = c.job_id; card.classList.toggle("sel", c.job_id === selectedJob);
  q("job-title").textContent = "job " + c.job_id + ": " + (c.file || "?") + " \u2192 " + (c.adapter || "?") + " (" + (c.phase || "training") + ")";
  q("job-where").textContent = placement(c); q("job-where").hidden = !placement(c);
  q("job-bar").style.width = pct.toFixed(1) + "%";
  q("progress-text").textContent = "step " + (c.step || 0) + "/" + (c.total_steps || "?") + " (" + pct.toFixed(0) + "%)" + (c.epoch != null ? ", epoch " + (Number.isInteger(c.epoch) ? c.epoch + 1 : num(c.epoch, 2)) : "");
  q("loss").textContent = num(c.loss, 4) + (c.reward_accuracy != null ? ", reward accuracy " + num(c.reward_accuracy, 2) : "");
  q("eval-loss").textContent = c.eval_loss == null ? "not yet" : num(c.eval_loss, 4);
  q("tps").textContent = c.tokens_per_s ? Math.round(c.tokens_per_s).toLocaleString("en-US") + " tok/s" : "?";
  q("eta").textContent = fmtEta(c.eta_s);
  q("job-mem").textContent = (c.gpu_mem_gib == null ? "none" : num(c.gpu_mem_gib, 2) + " GiB") + (c.gpu_peak_card_gib == null ? "" : ", card peak " + num(c.gpu_peak_card_gib, 2) + " GiB");
}

// A round tick spacing (1, 2 or 5 times a power of ten) giving about n intervals over `range`.
function niceStep(range, n) {
  const raw = range / n, p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

function drawChart(data) {
  const cv = $("chart"), dpr = window.devicePixelRatio || 1, w = cv.clientWidth, h = cv.clientHeight;
  cv.width = w * dpr; cv.height = h * dpr;
  const ctx = cv.getContext("2d"); ctx.scale(dpr, dpr); ctx.clearRect(0, 0, w, h);
  const train = data.train || [], ev = data.eval || [], all = train.concat(ev);
  cv.dataset.points = train.length; cv.dataset.evalPoints = ev.length;
  cv.dataset.lastStep = train.length ? train[train.length - 1][0] : 0;
  $("chart-job").textContent = data.job_id != null ? "job " + data.job_id : "";
  const L = 48, R = 10, T = 10, B = 28;
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#6b7280"; ctx.strokeStyle = "#e5e7eb";
  if (!all.length) { ctx.fillText("no loss recorded yet", w / 2 - 50, h / 2); return; }
  const xmax = Math.max(data.total_steps || 0, ...all.map(p => p[0]), 1), xmin = Math.min(0, ...all.map(p => p[0]));
  let ymin = Math.min(...all.map(p => p[1])), ymax = Math.max(...all.map(p => p[1]));
  if (ymax - ymin < 1e-6) { ymin -= 0.5; ymax += 0.5; }
  const pad = (ymax - ymin) * 0.05, ys = niceStep(ymax - ymin + 2 * pad, 5);
  ymin = Math.max(0, Math.floor((ymin - pad) / ys) * ys); ymax = Math.ceil((ymax + pad) / ys) * ys;  // the axis ends on ticks
  const X = s => L + (s - xmin) / (xmax - xmin) * (w - L - R), Y = v => T + (ymax - v) / (ymax - ymin) * (h - T - B);
  const yDigits = Math.max(0, -Math.floor(Math.log10(ys)));
  for (let v = ymin; v <= ymax + ys / 2; v += ys) {
    const y = Y(v); ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(w - R, y); ctx.stroke(); ctx.fillText(v.toFixed(yDigits), 4, y + 4);
  }
  const xs = Math.max(1, niceStep(xmax - xmin, 6));
  for (let s = Math.ceil(xmin / xs) * xs; s <= xmax; s += xs) ctx.fillText(String(s), X(s) - 3 * String(s).length, h - 10);
  ctx.lineWidth = 1.8; ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--train");
  ctx.beginPath(); train.forEach((p, i) => i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))); ctx.stroke();
  ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--eval");
  ev.forEach(p => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3.5, 0, 2 * Math.PI); ctx.fill(); });
  if (ev.length > 1) { ctx.strokeStyle = ctx.fillStyle; ctx.beginPath(); ev.forEach((p, i) => i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))); ctx.stroke(); }
}

function renderJobs(jobs) {
  const tb = $("jobs"); tb.replaceChildren();
  jobs.slice().reverse().forEach(j => {
    const tr = document.createElement("tr"); if (j.id === selectedJob) tr.className = "sel";
    cell(tr, j.id); cell(tr, j.state, j.state === "failed" ? "failed" : ""); cell(tr, j.adapter); cell(tr, j.original_name);
    cell(tr, j.promotion ? j.promotion.label : j.version != null ? "v" + j.version : ""); cell(tr, ((j.state === "failed" ? j.error : j.note) || "").split("\n")[0], "muted");
    tr.onclick = () => { selectedJob = (selectedJob === j.id ? null : j.id); poll(true); };
    tb.appendChild(tr);
  });
}

function renderVersions(vs) {
  const tb = $("versions"); tb.replaceChildren();
  vs.forEach(v => {
    const tr = document.createElement("tr");
    cell(tr, v.adapter); cell(tr, "v" + v.version + (v.latest ? " (latest)" : "") + (v.held ? " (held)" : "") + (v.damaged && v.damaged.length ? " (damaged: " + v.damaged.join("; ") + ")" : "")); cell(tr, v.job_id); cell(tr, v.source_file);
    cell(tr, v.steps); cell(tr, num(v.first_train_loss, 4)); cell(tr, num(v.final_train_loss, 4)); cell(tr, num(v.eval_loss, 4));
    cell(tr, fmtDur(v.training_seconds)); cell(tr, v.finished_at || "");
    const td = cell(tr, "");
    if (v.loss_plot_url) { const a = document.createElement("a"); a.href = v.loss_plot_url; a.textContent = "loss.png"; td.appendChild(a); }
    if (v.job_id != null) tr.onclick = (e) => { if (e.target.tagName !== "A") { selectedJob = v.job_id; poll(true); } };
    tb.appendChild(tr);
  });
}

const vname = (n) => n == null ? "none" : "v" + n;
// Per adapter: latest, newest, held; the newest version's probes side by side (incumbent | new | passed).
function renderAdapters(list) {
  const tb = $("adapters"), box = $("probes"); tb.replaceChildren(); box.replaceChildren();
  list.forEach(a => {
    const tr = document.createElement("tr"), j = a.newest_judgement;
    cell(tr, a.adapter); cell(tr, vname(a.latest)); cell(tr, vname(a.newest));
    cell(tr, a.held.length ? a.held.map(vname).join(", ") : "-", a.held.length ? "failed" : "");
    cell(tr, j && j.judged ? vname(j.version) + " " + j.decision + (j.reason ? ": " + j.reason : "") : "-", "muted");
    tb.appendChild(tr);
    if (!j || !j.probes.length) return;
    const h = document.createElement("h2"); h.style.marginTop = "10px";
    h.textContent = "Probes of " + a.adapter + " " + vname(j.version) + " (beside " + vname(j.incumbent_version) + ")";
    const t = document.createElement("table"); t.className = "probes";
    const head = document.createElement("tr");
    ["prompt", "incumbent " + vname(j.incumbent_version), "new " + vname(j.version), "passed"].forEach(x => { const th = document.createElement("th"); th.textContent = x; head.appendChild(th); });
    t.appendChild(head);
    j.probes.forEach(p => {
      const r = document.createElement("tr");
      cell(r, p.prompt + (p.required ? " (required)" : "")); cell(r, p.incumbent_answer ?? "-");
      cell(r, p.answer ?? "-"); cell(r, p.passed == null ? "-" : p.passed ? "yes" : "NO", p.passed === false ? "failed" : "");
      t.appendChild(r);
    });
    box.appendChild(h); box.appendChild(t);
  });
}

async function poll(force) {
  try {
    const st = await getJSON("/api/status");
    const current = renderStatus(st);
    const job = selectedJob ?? current;
    const loss = await getJSON("/api/loss" + (job != null ? "?job=" + encodeURIComponent(job) : ""));
    const key = JSON.stringify([loss.job_id, (loss.train || []).length, (loss.eval || []).length, loss.train && loss.train.slice(-1)]);
    if (force || key !== lastChart) { drawChart(loss); lastChart = key; }
    if (force || tick % 5 === 0) {
      renderJobs(await getJSON("/api/jobs?limit=30"));
      renderVersions(await getJSON("/api/versions"));
      renderAdapters(await getJSON("/api/adapters"));
    }
  } catch (e) {
    $("daemon-state").textContent = "status page unreachable (" + e.message + ")";
  }
  tick++;
}
window.addEventListener("resize", () => poll(true));
poll(true);
setInterval(poll, 1000);
</script>
</body></html>
"""
