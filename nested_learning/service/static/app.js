// The dashboard: a job list with a start form (#/) and a live page per job (#/jobs/<id>).
// Talks only to the /v1 API; live updates come from the job's Server-Sent Events stream.
"use strict";

const $ = (sel) => document.querySelector(sel);
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toPrecision(digits);
const fmtEta = (s) => (s === null || s === undefined) ? "–" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

async function api(method, path, body, contentType = "application/json") {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = contentType;
    opts.body = contentType === "application/json" ? JSON.stringify(body) : body;
  }
  const res = await fetch(path, opts);
  if (res.status === 401) { window.location.href = "/"; throw new Error("not signed in"); }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) {
    const msg = data && (data.message || (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)));
    throw new Error(`${res.status}: ${msg || res.statusText}`);
  }
  return data;
}

// ---------------------------------------------------------------- list view
let listTimer = null;

async function refreshList() {
  const { jobs } = await api("GET", "/v1/jobs");
  const tbody = $("#jobs tbody");
  tbody.innerHTML = jobs.slice().reverse().map((j) => `
    <tr data-id="${esc(j.id)}">
      <td><a href="#/jobs/${esc(j.id)}">${esc(j.id)}</a></td><td>${esc(j.name || "")}</td>
      <td><span class="badge ${esc(j.status)}">${esc(j.status)}</span></td>
      <td class="num">${j.step}/${j.total_steps}</td><td class="num">${fmt(j.train_loss)}</td>
      <td class="num">${fmt(j.val_loss)}</td><td>${esc((j.created_at || "").replace("T", " ").replace("+00:00", " UTC"))}</td>
    </tr>`).join("");
  $("#no-jobs").hidden = jobs.length > 0;
  tbody.querySelectorAll("tr").forEach((tr) => tr.addEventListener("click", () => { location.hash = `#/jobs/${tr.dataset.id}`; }));
}

function configFromFields(f) {
  const num = (name) => Number(f.elements[name].value);
  const cfg = {
    model: { name_or_path: f.elements.model.value.trim() },
    lora: { r: num("rank"), alpha: 2 * num("rank") },
    data: { max_length: num("max_length") },
    tiers: { periods: f.elements.periods.value.split(/[ ,]+/).filter(Boolean).map(Number) },
    optim: { lr: Number(f.elements.lr.value), batch_size: num("batch_size") },
    schedule: { steps: num("steps") },
    eval: { every: num("eval_every") },
    checkpoint: { every: num("ckpt_every") },
  };
  if (f.elements.train.value.trim()) cfg.data.train = f.elements.train.value.trim();
  if (f.elements.valid.value.trim()) cfg.data.valid = f.elements.valid.value.trim();
  return cfg;
}

async function startJob(ev) {
  ev.preventDefault();
  const f = ev.target, err = $("#form-error");
  err.hidden = true;
  $("#start-btn").disabled = true;
  try {
    const yamlMode = !f.querySelector('[data-pane="yaml"]').hidden;
    const cfg = yamlMode ? await api("POST", "/v1/config/from-yaml", f.elements.yaml.value, "text/plain") : configFromFields(f);
    const query = new URLSearchParams();
    const name = f.elements.name.value.trim();
    if (name) query.set("name", name);
    query.set("devices", f.elements.devices.value.trim() || "1");  // GPUs (data-parallel ranks) for the job
    const job = await api("POST", `/v1/jobs?${query}`, cfg);
    location.hash = `#/jobs/${job.id}`;
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  } finally {
    $("#start-btn").disabled = false;
  }
}

// ---------------------------------------------------------------- job view
const nl = (window.nl = { job: null, steps: new Map(), charts: {}, source: null, tiers: 0, retain: [] });

const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];

function makeChart(el, series, yLabel, yValues) {
  const width = Math.max(300, el.clientWidth || 500);
  const opts = {
    width, height: 240, legend: { live: false },
    scales: { x: { time: false } },
    axes: [{ label: "step", incrs: STEP_INCRS }, { label: yLabel, size: 70, ...(yValues ? { values: yValues } : {}) }],
    series: [{ label: "step" }, ...series.map((s) => ({ spanGaps: true, width: 2, points: { show: false }, ...s }))],
  };
  el.innerHTML = "";
  return new uPlot(opts, [[], ...series.map(() => [])], el);
}

const TIER_COLORS = ["#2f6fde", "#e0822c", "#2a9d5b", "#b83ac2", "#c9382c", "#5a6b7d"];

const RETAIN_COLORS = ["#c9382c", "#b83ac2", "#5a6b7d", "#2a9d5b", "#8a6d1f"];

// retainNames: the job's eval.retain sets; each draws its forgetting curve next to the val (learning) curve.
function buildCharts(periods, retainNames) {
  const nTiers = periods.length;
  nl.tiers = nTiers;
  nl.retain = retainNames || [];
  nl.charts.loss = makeChart($("#chart-loss"), [
    { label: "train", stroke: "#2f6fde" },
    { label: "val", stroke: "#e0822c", points: { show: true, size: 6 } },
    ...nl.retain.map((name, i) => ({ label: `retain ${name}`, stroke: RETAIN_COLORS[i % RETAIN_COLORS.length],
      dash: [6, 4], points: { show: true, size: 5 } })),
  ], "loss");
  nl.charts.lr = makeChart($("#chart-lr"), [{ label: "lr", stroke: "#2a9d5b" }], "lr",
    (u, vals) => vals.map((v) => (v === 0 ? "0" : v.toExponential(2))));
  nl.charts.tiers = makeChart($("#chart-tiers"),
    Array.from({ length: nTiers }, (_, i) => ({ label: `tier ${i} (every ${periods[i]})`, stroke: TIER_COLORS[i % TIER_COLORS.length] })), "updates");
}

let redrawPending = false;
function redraw() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => {
    redrawPending = false;
    const steps = [...nl.steps.keys()].sort((a, b) => a - b);
    const col = (fn) => steps.map((s) => { const v = fn(nl.steps.get(s)); return v === undefined ? null : v; });
    nl.charts.loss.setData([steps, col((r) => r.train_loss), col((r) => r.val_loss),
      ...nl.retain.map((name) => col((r) => (r.retain || {})[name]))]);
    nl.charts.lr.setData([steps, col((r) => r.lr)]);
    nl.charts.tiers.setData([steps, ...Array.from({ length: nl.tiers }, (_, i) => col((r) => (r.tier_updates || [])[i]))]);
  });
}

function addMetric(row) {
  if (row.kind === "checkpoint") { refreshCheckpoints(); return; }
  const entry = nl.steps.get(row.step) || {};
  if (row.kind === "train") Object.assign(entry, { train_loss: row.train_loss, lr: row.lr, tier_updates: row.tier_updates });
  if (row.kind === "eval") {
    entry.val_loss = row.val_loss;
    // eval rows carry `retain_loss/<name>` per retain set (and `retain_loss`, their mean)
    entry.retain = Object.fromEntries(nl.retain.map((name) => [name, row[`retain_loss/${name}`]]));
  }
  nl.steps.set(row.step, entry);
  redraw();
}

function showStatus(j) {
  nl.job = Object.assign(nl.job || {}, j);
  $("#job-title").textContent = j.name ? `${j.name} (${j.id})` : `job ${j.id}`;
  const badge = $("#job-status");
  badge.textContent = j.stop_requested && j.status === "running" ? "stopping" : j.status;
  badge.className = `badge ${j.status}`;
  $("#s-step").textContent = `${j.step} / ${j.total_steps}`;
  $("#s-train").textContent = fmt(j.train_loss);
  $("#s-val").textContent = fmt(j.val_loss);
  $("#s-best").textContent = fmt(j.best_val_loss);
  $("#s-lr").textContent = j.lr ? Number(j.lr).toExponential(2) : "–";
  $("#s-tps").textContent = j.tokens_per_sec ? Math.round(j.tokens_per_sec) : "–";
  $("#s-eta").textContent = fmtEta(j.eta_s);
  // how many devices the job runs on, and which GPUs once the scheduler gave it some
  $("#s-devices").textContent = j.gpu ? `${j.devices || 1} (GPU ${j.gpu})` : String(j.devices || 1);
  $("#stop-btn").disabled = !["queued", "running"].includes(j.status) || j.stop_requested;
  $("#resume-btn").disabled = !["stopped", "interrupted", "failed"].includes(j.status);
  const err = $("#job-error");
  err.hidden = !j.error;
  err.textContent = j.error || "";
}

async function refreshCheckpoints() {
  if (!nl.job) return;
  try {
    const { checkpoints } = await api("GET", `/v1/jobs/${nl.job.id}/checkpoints`);
    $("#checkpoints").innerHTML = checkpoints.length
      ? checkpoints.map((c) => `<li><b>${esc(c.name)}</b> step ${c.step}${c.val_loss != null ? `, val ${fmt(c.val_loss)}` : ""}</li>`).join("")
      : '<li class="muted">none yet</li>';
  } catch (e) { /* the list is informative only */ }
}

async function refreshLog() {
  if (!nl.job) return;
  try { const el = $("#log"); el.textContent = await api("GET", `/v1/jobs/${nl.job.id}/logs?tail=60`); el.scrollTop = el.scrollHeight; } catch (e) { /* ignore */ }
}

function follow(id) {
  if (nl.source) nl.source.close();
  const last = Math.max(0, ...[...nl.seqs]);
  const es = new EventSource(`/v1/jobs/${id}/events?after=${last}`);
  nl.source = es;
  es.addEventListener("metric", (ev) => { const row = JSON.parse(ev.data); nl.seqs.add(row.seq); addMetric(row); });
  es.addEventListener("status", (ev) => { showStatus(JSON.parse(ev.data)); refreshLog(); });
  es.addEventListener("end", () => { es.close(); nl.source = null; refreshCheckpoints(); refreshLog(); });
}

async function openJob(id) {
  nl.steps = new Map();
  nl.seqs = new Set([0]);
  const job = await api("GET", `/v1/jobs/${id}`);
  buildCharts(job.config.tiers.periods || [], Object.keys((job.config.eval || {}).retain || {}));
  showStatus(job);
  // /metrics is paged: follow the cursor to the end of the history.
  let after = null;
  do {
    const page = await api("GET", `/v1/jobs/${id}/metrics?limit=10000${after === null ? "" : `&after=${after}`}`);
    page.metrics.forEach((row) => { nl.seqs.add(row.seq); addMetric(row); });
    after = page.next_after;
  } while (after !== null && after !== undefined);
  refreshCheckpoints();
  refreshLog();
  follow(id);
}

async function stopJob() {
  $("#stop-btn").disabled = true;
  showStatus(await api("POST", `/v1/jobs/${nl.job.id}/stop`));
}

async function resumeJob() {
  $("#resume-btn").disabled = true;
  showStatus(await api("POST", `/v1/jobs/${nl.job.id}/resume`));
  follow(nl.job.id);
}

// ---------------------------------------------------------------- routing
function route() {
  clearInterval(listTimer);
  if (nl.source) { nl.source.close(); nl.source = null; }
  const m = location.hash.match(/^#\/jobs\/([\w-]+)/);
  $("#view-list").hidden = !!m;
  $("#view-job").hidden = !m;
  if (m) {
    openJob(m[1]).catch((e) => { $("#job-error").hidden = false; $("#job-error").textContent = e.message; });
  } else {
    nl.job = null;
    refreshList();
    listTimer = setInterval(refreshList, 2000);
  }
}

document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll(".tabs button").forEach((x) => x.classList.toggle("active", x === b));
  document.querySelectorAll("[data-pane]").forEach((p) => { p.hidden = p.dataset.pane !== b.dataset.tab; });
}));
$("#start-form").addEventListener("submit", startJob);
$("#stop-btn").addEventListener("click", () => stopJob().catch((e) => alert(e.message)));
$("#resume-btn").addEventListener("click", () => resumeJob().catch((e) => alert(e.message)));
window.addEventListener("hashchange", route);
api("GET", "/v1/healthz").then((h) => { $("#health").textContent = `v${h.version} · slots: ${h.slots.join(", ")}`; }).catch(() => {});
route();
