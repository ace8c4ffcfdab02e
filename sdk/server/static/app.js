// edgefleet dashboard: fetches the REST API, listens to /api/events (SSE) and refetches only what
// changed; charts are SVG drawn here (no libraries: nothing may be downloaded at run time).
"use strict";

const state = {
  token: sessionStorage.getItem("edgefleet-token") || "",
  actions: false,
  source: null,
  pending: new Set(),
  timer: null,
  lastRun: 0,
  cmp: { model: "", a: "", b: "" },
  models: [],
};
const PALETTE = ["#2f6fde", "#d64545", "#1f9d55", "#d99a1e", "#8a4fd8", "#13a3b5", "#e0669e", "#6b7385"];
const MIN_REFRESH_MS = 1000;

// ---- helpers ---------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function fmt(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + " %";
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

// The quality vocabulary (docs/quality.md): accuracy against labels, agreement and fidelity against the
// reference model's outputs, then accuracy on live feedback. Each row or window carries those it scored.
const QUALITY = [
  { key: "accuracy", label: "accuracy", show: pct },
  { key: "agreement", label: "agreement", show: pct },
  { key: "fidelity", label: "fidelity", show: (v) => fmt(v, 4) },
  { key: "live_accuracy", label: "live accuracy", show: pct },
  // Agreement with the model it replaced on live requests (shadow evaluation during a rollout's soak).
  { key: "live_agreement", label: "live agreement", show: pct },
];

// The first quality reading a row carries, by the vocabulary's name: {key, label, value, text}, or null.
function qualityOf(p) {
  for (const q of QUALITY) {
    const v = p[q.key];
    if (v !== null && v !== undefined) return Object.assign({}, q, { value: v, text: `${q.label} ${q.show(v)}` });
  }
  return null;
}

function qualityValue(p) {
  const q = qualityOf(p);
  return q === null ? null : q.value;
}

// A series labelled with the metric its points carry, so a chart never mixes names silently.
function withMetric(series) {
  return series.map((s) => {
    const q = s.points.map(qualityOf).find((x) => x !== null);
    return Object.assign({}, s, { label: q ? `${s.label} · ${q.label}` : s.label });
  });
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) {
    showTokenForm(state.token ? "that token was refused" : "");
    throw new Error("unauthorized");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.detail || res.statusText);
  return body;
}

// ---- token -----------------------------------------------------------------------------------

function showTokenForm(message) {
  document.getElementById("token-form").classList.remove("hidden");
  document.getElementById("token-error").textContent = message || "";
  setLive(false, "needs token");
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem("edgefleet-token", state.token);
  document.getElementById("token-form").classList.add("hidden");
  connect();
});

// ---- live updates ----------------------------------------------------------------------------

function setLive(on, text) {
  const node = document.getElementById("live");
  node.className = "live " + (on ? "on" : "off");
  node.textContent = text;
}

function connect() {
  if (state.source) state.source.close();
  const url = "/api/events" + (state.token ? "?access_token=" + encodeURIComponent(state.token) : "");
  const source = new EventSource(url);
  state.source = source;
  source.addEventListener("hello", (ev) => {
    const hello = JSON.parse(ev.data);
    state.actions = !!hello.actions;
    document.getElementById("fleet-name").textContent = hello.fleet;
    setLive(true, "live");
    schedule(["devices", "rollouts", "telemetry", "events"]);
  });
  for (const kind of ["devices", "rollouts", "telemetry", "events"]) {
    source.addEventListener(kind, () => schedule([kind]));
  }
  source.onerror = () => {
    setLive(false, "reconnecting");
    // A refused token closes the stream for good; ask the API to find out whether that is why.
    if (source.readyState === EventSource.CLOSED) api("/api/health").then(connect, () => {});
  };
}

// Coalesce bursts of notices: refresh each changed part at most once per MIN_REFRESH_MS.
function schedule(kinds) {
  kinds.forEach((k) => state.pending.add(k));
  if (state.timer) return;
  const wait = Math.max(0, state.lastRun + MIN_REFRESH_MS - Date.now());
  state.timer = setTimeout(runPending, wait);
}

async function runPending() {
  state.timer = null;
  state.lastRun = Date.now();
  const kinds = new Set(state.pending);
  state.pending.clear();
  const jobs = [];
  if (kinds.has("devices") || kinds.has("telemetry") || kinds.has("rollouts")) jobs.push(loadDevices());
  if (kinds.has("rollouts")) jobs.push(loadRollouts());
  if (kinds.has("telemetry")) jobs.push(loadCharts(), loadCompare());
  if (kinds.has("events") || kinds.has("rollouts")) jobs.push(loadEvents());
  await Promise.allSettled(jobs);
}

// ---- fleet table -----------------------------------------------------------------------------

async function loadDevices() {
  const devices = await api("/api/devices");
  const tbody = document.querySelector("#fleet-table tbody");
  document.getElementById("fleet-count").textContent =
    `${devices.filter((d) => d.online).length} online / ${devices.length}`;
  tbody.replaceChildren();
  if (!devices.length) {
    tbody.append(el("tr", { class: "empty" }, el("td", { colspan: 10 }, "no devices yet")));
    return;
  }
  for (const d of devices) {
    const latest = d.latest || {};
    const model = d.active_model ? `${d.active_model} v${d.active_version}` : "none";
    const modelCell = el("td", { class: "model" }, model);
    if (d.differs) {
      modelCell.append(el("span", { class: "badge warn", title: "desired model" },
        `→ ${d.desired_model} v${d.desired_version}`));
    }
    tbody.append(el("tr", { "data-device": d.device_id, "data-online": d.online ? "1" : "0" },
      el("td", { class: "device" }, d.device_id, d.emulated ? el("span", { class: "badge" }, "emulated") : null),
      el("td", {}, el("span", { class: "dot " + (d.online ? "online" : "offline") }), d.online ? "online" : "offline"),
      el("td", {}, d.profile || "–"),
      modelCell,
      el("td", {}, d.agent_version || "–"),
      el("td", { class: "num p50" }, fmt(latest.p50_ms, 3)),
      el("td", { class: "num p95" }, fmt(latest.p95_ms, 3)),
      el("td", { class: "num quality" }, (qualityOf(latest) || { text: "–" }).text),
      el("td", { class: "num" }, latest.count === undefined || latest.count === null ? "–" : latest.count),
      el("td", { title: d.last_seen ? new Date(d.last_seen * 1000).toISOString() : "" }, ago(d.last_seen)),
    ));
  }
}

// ---- rollouts --------------------------------------------------------------------------------

const STATUS_CLASS = { succeeded: "ok", completed: "warn", aborted: "bad", aborting: "bad", running: "warn", pending: "" };

async function loadRollouts() {
  const rollouts = await api("/api/rollouts?limit=10");
  const box = document.getElementById("rollouts");
  box.replaceChildren();
  if (!rollouts.length) {
    box.append(el("p", { class: "muted" }, "no rollouts yet"));
    return;
  }
  for (const r of rollouts) {
    const p = r.progress;
    const chips = el("div", { class: "chips" },
      r.devices.map((d) => el("span", { "data-device": d.device_id, "data-status": d.status, title: d.reason || "" },
        `${d.device_id}: ${d.status}`)));
    const abort = state.actions && !r.finished
      ? el("button", { class: "danger", onclick: () => abortRollout(r.id) }, "Abort")
      : null;
    box.append(el("div", { class: "rollout", "data-rollout": r.id, "data-status": r.status },
      el("div", { class: "rollout-head" },
        el("span", {},
          el("span", { class: "id" }, r.id),
          el("span", { class: "badge status " + (STATUS_CLASS[r.status] || "") }, r.status),
          el("span", { class: "muted" }, ` ${r.strategy} → ${r.selector}`)),
        el("span", {},
          el("span", { class: "progress-text" }, progressText(r)),
          el("span", { class: "muted" }, ` · ${clock(r.created_at)} `),
          abort)),
      el("div", { class: "bar" }, el("div", { style: `width:${(100 * p.fraction).toFixed(1)}%` })),
      chips,
      r.reason ? el("div", { class: "reason" }, r.reason) : null,
    ));
  }
}

// A rollout that ended other than by success says so, with what each device is now ("aborted: 1
// rolled-back, 1 not-notified"), never "3/3 finished".
function progressText(r) {
  const p = r.progress;
  if (["aborted", "aborting", "completed"].includes(r.status)) return `${r.status}: ${p.summary || "no devices"}`;
  return `${p.finished}/${p.total} finished`;
}

async function abortRollout(id) {
  if (!confirm(`Abort rollout ${id}? Devices it reached roll back.`)) return;
  try {
    await api(`/api/rollouts/${encodeURIComponent(id)}/abort`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reason: "aborted from the dashboard" }),
    });
  } catch (err) {
    alert("abort failed: " + err.message);
  }
  schedule(["rollouts"]);
}

// ---- charts ----------------------------------------------------------------------------------

function windowParams() {
  const windowS = Number(document.getElementById("window").value);
  // About 100 points across the window, never finer than the agents' usual telemetry interval.
  const bucket = Math.max(2, Math.round(windowS / 100));
  return { windowS, bucket };
}

// Draw series [{label, points:[{ts, ...}]}] of `value(point)` as lines with one circle per point.
function lineChart(container, series, value, opts = {}) {
  const W = 600, H = 220, L = 48, R = 12, T = 10, B = 26;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const usable = series
    .map((s, i) => ({ label: s.label, color: s.color || PALETTE[i % PALETTE.length],
      pts: s.points.map((p) => [p.ts, value(p)]).filter((xy) => xy[1] !== null && xy[1] !== undefined) }))
    .filter((s) => s.pts.length);
  container.replaceChildren(root);
  if (!usable.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" }, "no data yet"));
    return;
  }
  const xs = usable.flatMap((s) => s.pts.map((p) => p[0]));
  const ys = usable.flatMap((s) => s.pts.map((p) => p[1]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 30; x1 += 30; }
  let y0 = opts.yMin !== undefined ? Math.min(opts.yMin, Math.min(...ys)) : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? Math.max(opts.yMax, Math.max(...ys)) : Math.max(...ys);
  if (opts.zero) y0 = Math.min(0, y0);
  if (y1 === y0) {
    // A flat line: open a band around it, never above a hard ceiling such as 100 % accuracy.
    const pad = Math.abs(y1) * 0.1 || 1;
    if (opts.yMax !== undefined && y1 >= opts.yMax) y0 = y1 - pad;
    else { y1 += pad; y0 = opts.zero ? y0 : y0 - pad; }
  }
  // Round the axis to a 1/2/5 × 10^n step so tick labels read as plain numbers.
  const raw = (y1 - y0) / 4;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((c) => c >= raw) || raw;
  y0 = Math.floor(y0 / step + 1e-9) * step;
  y1 = Math.max(y0 + step, Math.ceil(y1 / step - 1e-9) * step);
  if (opts.yMax !== undefined && y1 > opts.yMax && Math.max(...ys) <= opts.yMax) y1 = opts.yMax;
  const ticks = Math.round((y1 - y0) / step);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= ticks; i++) {
    const y = Math.min(y1, y0 + step * i);
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
    root.append(svg("text", { x: L - 6, y: sy(y) + 3, "text-anchor": "end" }, (opts.format || fmt)(y)));
  }
  for (let i = 0; i <= 3; i++) {
    const x = x0 + ((x1 - x0) * i) / 3;
    const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
    root.append(svg("text", { x: sx(x), y: H - 8, "text-anchor": anchor }, clock(x)));
  }
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const s of usable) {
    const g = svg("g", { class: "series", "data-label": s.label });
    g.append(svg("polyline", { class: "line", stroke: s.color,
      points: s.pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") }));
    for (const [x, y] of s.pts) {
      const c = svg("circle", { class: "pt", cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.6, fill: s.color });
      c.append(svg("title", {}, `${s.label} ${clock(x)}: ${(opts.format || fmt)(y)}`));
      g.append(c);
    }
    root.append(g);
  }
  container.append(el("div", { class: "legend" },
    usable.map((s) => el("span", {}, el("i", { style: `background:${s.color}` }), s.label))));
}

async function loadCharts() {
  const { windowS, bucket } = windowParams();
  const q = `window_s=${windowS}&bucket_s=${bucket}`;
  const [byDevice, byVersion] = await Promise.all([
    api(`/api/telemetry?group_by=device&${q}`),
    api(`/api/telemetry?group_by=version&${q}`),
  ]);
  const qFmt = (v) => v.toFixed(3);
  lineChart(document.getElementById("chart-latency-device"), byDevice.series, (p) => p.p95_ms, { zero: true });
  lineChart(document.getElementById("chart-quality-device"), withMetric(byDevice.series), qualityValue, { format: qFmt, yMax: 1 });
  lineChart(document.getElementById("chart-latency-version"), byVersion.series, (p) => p.p95_ms, { zero: true });
  lineChart(document.getElementById("chart-quality-version"), withMetric(byVersion.series), qualityValue, { format: qFmt, yMax: 1 });
}

document.getElementById("window").addEventListener("change", () => schedule(["telemetry"]));

// ---- compare ---------------------------------------------------------------------------------

function fillSelect(select, values, chosen) {
  const current = select.value;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  select.value = values.includes(chosen) ? chosen : values.includes(current) ? current : values[values.length - 1] || "";
}

// Every model version with its fleet-wide quality, one column per metric of the vocabulary.
function renderVersions(models) {
  const head = ["model", "version", "devices", "inferences", "p95 ms", ...QUALITY.map((q) => q.label)];
  const table = el("table", { class: "versions-table" },
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", { class: i > 1 ? "num" : "" }, h)))),
    el("tbody", {}, models.map((m) => el("tr", { "data-version": `${m.model_name} v${m.model_version}` },
      el("td", {}, m.model_name),
      el("td", {}, `v${m.model_version}`),
      el("td", { class: "num" }, m.devices),
      el("td", { class: "num" }, m.count),
      el("td", { class: "num" }, fmt(m.p95_ms, 3)),
      QUALITY.map((q) => el("td", { class: `num ${q.key}` }, q.show(m[q.key])))))));
  document.getElementById("versions").replaceChildren(models.length ? table : el("p", { class: "muted" }, "no telemetry yet"));
}

async function loadCompare() {
  state.models = await api("/api/models");
  renderVersions(state.models);
  const names = [...new Set(state.models.map((m) => m.model_name))];
  const modelSel = document.getElementById("cmp-model");
  if (!names.length) return;
  fillSelect(modelSel, names, state.cmp.model || names[0]);
  const versions = state.models.filter((m) => m.model_name === modelSel.value)
    .map((m) => String(m.model_version)).sort((x, y) => Number(x) - Number(y));
  const defB = versions[versions.length - 1];
  const defA = versions.length > 1 ? versions[versions.length - 2] : defB;
  fillSelect(document.getElementById("cmp-a"), versions, state.cmp.a || defA);
  fillSelect(document.getElementById("cmp-b"), versions, state.cmp.b || defB);
  const { windowS, bucket } = windowParams();
  const since = Date.now() / 1000 - windowS;
  const params = new URLSearchParams({ model: modelSel.value, a: document.getElementById("cmp-a").value,
    b: document.getElementById("cmp-b").value, bucket_s: bucket, since });
  const cmp = await api("/api/compare?" + params);
  renderCompare(cmp);
}

function renderCompare(cmp) {
  const a = cmp.a.summary, b = cmp.b.summary;
  // lower is better for latency, higher for every quality metric; the better side of each row is highlighted.
  const rows = [
    ["devices", "devices", (v) => v, null],
    ["inferences", "count", (v) => v, null],
    ["p50 ms", "p50_ms", (v) => fmt(v, 3), -1],
    ["p95 ms", "p95_ms", (v) => fmt(v, 3), -1],
    ["p99 ms", "p99_ms", (v) => fmt(v, 3), -1],
    ...QUALITY.map((q) => [q.label, q.key, q.show, 1]),
  ];
  const cls = (mine, other, dir) => {
    if (dir === null || mine === null || other === null || mine === other) return "";
    return (mine - other) * dir > 0 ? "better" : "worse";
  };
  const table = el("table", { class: "compare-table" },
    el("thead", {}, el("tr", {}, el("th", {}, cmp.model),
      el("th", { class: "num" }, `A: v${a.model_version}`), el("th", { class: "num" }, `B: v${b.model_version}`))),
    el("tbody", {}, rows.map(([label, key, show, dir]) => el("tr", { "data-field": key },
      el("td", {}, label),
      el("td", { class: "num a " + cls(a[key], b[key], dir) }, show(a[key])),
      el("td", { class: "num b " + cls(b[key], a[key], dir) }, show(b[key]))))));
  document.getElementById("compare").replaceChildren(table);
  const series = [
    { label: `A v${a.model_version}`, points: cmp.a.points, color: PALETTE[0] },
    { label: `B v${b.model_version}`, points: cmp.b.points, color: PALETTE[1] },
  ];
  lineChart(document.getElementById("chart-compare-latency"), series, (p) => p.p95_ms, { zero: true });
  lineChart(document.getElementById("chart-compare-quality"), withMetric(series), qualityValue,
    { format: (v) => v.toFixed(3), yMax: 1 });
}

for (const id of ["cmp-model", "cmp-a", "cmp-b"]) {
  document.getElementById(id).addEventListener("change", () => {
    state.cmp = {
      model: document.getElementById("cmp-model").value,
      a: id === "cmp-model" ? "" : document.getElementById("cmp-a").value,
      b: id === "cmp-model" ? "" : document.getElementById("cmp-b").value,
    };
    loadCompare().catch(() => {});
  });
}

// ---- events ----------------------------------------------------------------------------------

function describe(evt) {
  const p = evt.payload || {};
  const bits = [p.type || evt.kind];
  if (p.step) bits.push(p.step);
  if (p.name) bits.push(`${p.name} v${p.version}`);
  if (p.code) bits.push(p.code);
  if (p.reason) bits.push(p.reason);
  return bits.join(" · ");
}

async function loadEvents() {
  const events = await api("/api/events/recent?limit=40");
  const list = document.getElementById("events");
  list.replaceChildren();
  if (!events.length) {
    list.append(el("li", { class: "muted" }, "no events yet"));
    return;
  }
  for (const e of events) {
    list.append(el("li", { "data-kind": e.kind },
      el("span", { class: "time" }, clock(e.ts)), el("strong", {}, e.device_id), " ", describe(e)));
  }
}

// Relative "last seen" times age even when nothing changes.
setInterval(() => schedule(["devices"]), 15000);
connect();
// Load once without waiting for the stream, so the page fills even where a proxy holds SSE back.
schedule(["devices", "rollouts", "telemetry", "events"]);
