// The Federated panel: tasks, rounds, participants, accuracy per round and ε spent (GET /api/federated).
"use strict";

async function loadFederated() {
  const box = document.getElementById("federated");
  if (!box) return;
  let tasks;
  try {
    tasks = await api("/api/federated");
  } catch (err) {
    return;
  }
  box.replaceChildren();
  if (!tasks.length) {
    box.append(el("p", { class: "muted" }, "no federated tasks yet"));
    return;
  }
  const rows = tasks.map((t) =>
    el("tr", {},
      el("td", {}, t.task_id),
      el("td", {}, `${t.model} v${t.version}` + (t.result_version ? ` → v${t.result_version}` : "")),
      el("td", {}, t.status),
      el("td", { class: "num" }, `${t.rounds_done}/${t.rounds}`),
      el("td", { class: "num" }, t.participants == null ? "–" : String(t.participants)),
      el("td", { class: "num" }, t.accuracy == null ? "–" : fmt(t.accuracy, 4)),
      el("td", { class: "num" }, t.epsilon == null ? "–" : `${fmt(t.epsilon, 3)} (δ ${t.delta})`),
    ));
  box.append(el("table", {},
    el("thead", {}, el("tr", {},
      el("th", {}, "task"), el("th", {}, "model"), el("th", {}, "status"), el("th", { class: "num" }, "rounds"),
      el("th", { class: "num" }, "participants"), el("th", { class: "num" }, "accuracy"), el("th", { class: "num" }, "ε spent"))),
    el("tbody", {}, ...rows)));
  const latest = tasks[0];
  const detail = await api(`/api/federated/${encodeURIComponent(latest.task_id)}`).catch(() => null);
  if (detail && detail.rounds && detail.rounds.length) {
    const chart = el("div", { class: "chart", id: "chart-federated" });
    box.append(el("figure", {}, el("figcaption", {}, `accuracy per round · ${latest.task_id}`), chart));
    lineChart(chart, [{ label: "accuracy", points: detail.rounds.map((r) => ({ ts: r.round, value: r.accuracy })) }], (p) => p.value);
  }
}

loadFederated();
setInterval(loadFederated, 10000);
